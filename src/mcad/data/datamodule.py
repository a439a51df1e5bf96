"""One LightningDataModule for multi-class training over MVTec AD, VisA, MVTec-layout folders and synthetic data."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from mcad.data.augment import reseed_from_torch
from mcad.data.dataset import AnomalyDataset, DecodedCache, Normalizer, build_transform
from mcad.data.datasets.mvtec import (
    MVTEC_CLASSES,
    MVTEC_MANUAL,
    MVTEC_SHA256,
    MVTEC_URL,
    discover_classes,
    mvtec_layout_records,
)
from mcad.data.datasets.synthetic import SYNTHETIC_CLASSES, generate_synthetic_dataset
from mcad.data.datasets.visa import VISA_CLASSES, VISA_MANUAL, VISA_SHA256, VISA_URL, visa_records
from mcad.data.download import download_and_extract
from mcad.data.io import DataError
from mcad.data.records import SampleRecord

log = logging.getLogger(__name__)

FORMATS = ("mvtec", "visa", "folder", "synthetic")
SAMPLERS = ("random", "mixed_class", "class_balanced")


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """``worker_init_fn`` of every loader: Lightning's worker seeding, then a fresh view-pipeline seed.

    albumentations >= 2 keeps its RNG inside the ``Compose`` object, so forked workers would all start
    from the parent's copy and produce identical "random" views (and, without persistent workers, the
    same ones every epoch). Lightning adds its own ``worker_init_fn`` only when none is set, so it is
    called here when ``seed_everything(workers=True)`` asked for it.
    """
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)
    info = get_worker_info()
    view = getattr(info.dataset, "view_transform", None) if info is not None else None
    if view is not None:
        reseed_from_torch(view)


class ShuffledIndices(Sampler[int]):
    """A random order of ``range(num_samples)`` that is a pure function of ``(seed, epoch)``.

    ``RandomSampler`` draws its order from the global torch RNG when an epoch starts; a resumed run
    re-seeds that RNG and creating loaders consumes it in a different order, so the resumed epochs would
    see other batches than an uninterrupted run. Here the order depends on nothing else.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples).tolist())


class ClassBalancedIndices(Sampler[int]):
    """An epoch of ``len(class_ids)`` indices in which every class is drawn equally often.

    For unbalanced training sets (the real proxy: 209 bottle vs 31 cookie images) a plain shuffle shows
    the small class a few dozen times per run. Here each class gets ``n // K`` draws per epoch (the
    remainder goes to randomly chosen classes); within a class the images are drawn in shuffled passes,
    so a small class repeats only once all of its images were seen. Like :class:`ShuffledIndices`, the
    order is a pure function of ``(seed, epoch)``.

    Args:
        class_ids: Class index of every training sample.
        seed: Seed of the order.
    """

    def __init__(self, class_ids: Sequence[int], seed: int = 0) -> None:
        self.class_ids, self.seed, self.epoch = np.asarray(class_ids), seed, 0
        self.members = [np.flatnonzero(self.class_ids == c) for c in np.unique(self.class_ids)]

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.class_ids)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch])
        k, n = len(self.members), len(self.class_ids)
        counts = np.full(k, n // k)
        counts[rng.choice(k, n % k, replace=False)] += 1
        drawn = []
        for members, count in zip(self.members, counts):
            passes = -(-count // len(members))
            drawn.append(np.concatenate([rng.permutation(members) for _ in range(passes)])[:count])
        return iter(rng.permutation(np.concatenate(drawn)).tolist())


class MixedClassOrder(Sampler[int]):
    """An index order whose training batches each contain at least two classes (class-aware contrastive losses).

    The order of ``order`` (a plain shuffle, or :class:`ClassBalancedIndices` for
    ``data.sampler=class_balanced``) is kept, except that in every batch holding a single class the last
    element is swapped for a random sample of another class. With 12-15 classes at batch 16 this almost
    never triggers; it guards small proxies.

    It is a flat sampler (not a batch sampler), so that under DDP Lightning shards it as it shards every
    training sampler (``DistributedSamplerWrapper`` without shuffling: rank ``r`` reads positions
    ``r, r + W, r + 2W, ...``). The batches checked are therefore the ones each of the ``num_replicas``
    ranks will cut from its share: consecutive runs of ``batch_size`` positions of that strided stream.

    Args:
        class_ids: Class (or pseudo-class) index of every sample: what must be mixed.
        batch_size: Per-process batch size (>= 2).
        seed: Seed of the default order and of the swaps.
        order: Index order with ``set_epoch`` (default: ``ShuffledIndices(len(class_ids), seed)``).
        num_replicas: Number of processes the order will be sharded over (the DDP world size).
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        batch_size: int,
        seed: int = 0,
        order: Sampler[int] | None = None,
        num_replicas: int = 1,
    ) -> None:
        self.class_ids = np.asarray(class_ids)
        if len(set(self.class_ids.tolist())) < 2:
            raise DataError("A mixed-class batch sampler needs at least two classes in the training set.")
        if batch_size < 2:
            raise DataError("Mixed-class batches need batch_size >= 2.")
        self.batch_size, self.seed, self.epoch, self.num_replicas = batch_size, seed, 0, max(1, int(num_replicas))
        self.order = order if order is not None else ShuffledIndices(len(self.class_ids), seed)

    def set_epoch(self, epoch: int) -> None:
        """Selects the order of ``epoch`` (called by the training loop when supported)."""
        self.epoch = epoch
        self.order.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 2])
        flat = np.asarray(list(self.order), dtype=np.int64)
        for rank in range(self.num_replicas):
            stream = np.arange(rank, len(flat), self.num_replicas)  # the positions this rank will read
            for start in range(0, len(stream), self.batch_size):
                batch = stream[start : start + self.batch_size]
                if len(batch) < 2 or len(np.unique(self.class_ids[flat[batch]])) > 1:
                    continue
                others = np.flatnonzero(self.class_ids != self.class_ids[flat[batch[0]]])
                flat[batch[-1]] = others[rng.integers(len(others))]
        return iter(flat.tolist())


class EpochSeededSampler(Sampler):
    """Wraps the training sampler: the order of an epoch and a seed for every drawn sample.

    A pass yields ``(index, sample_seed)`` instead of ``index``, in the inner sampler's order for
    :attr:`epoch`. :class:`~mcad.data.dataset.AnomalyDataset` draws all of a sample's randomness
    (image-level synthesizer, augmented view) from ``sample_seed``. So batches and their random content
    depend only on ``(seed, epoch)``: not on the number of loader workers, persistent workers, the global
    RNG, or how often the loop re-creates its iterator (Lightning does so once more when a run
    resumes), and a resumed run continues with the epochs of an uninterrupted one.

    The training loop selects the epoch with :meth:`set_epoch` before every epoch (Lightning does, also
    through its ``DistributedSamplerWrapper``, which shards this sampler's passes under DDP); the first pass
    of a fit may start earlier (loader prefetch), so the constructor takes the epoch to start at, which the
    data module saves in checkpoints.

    Args:
        inner: A sampler of indices (optionally with ``set_epoch``).
        seed: Seed of the per-sample seeds.
        epoch: Epoch of the first pass (restored from a checkpoint when resuming).
    """

    def __init__(self, inner: Sampler, seed: int, epoch: int = 0) -> None:
        self.inner, self.seed, self.epoch = inner, seed, epoch

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch of the next pass."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        set_epoch = getattr(self.inner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        # A stream apart from the order's, so that the order of an epoch does not depend on the seeds.
        seeds = np.random.default_rng([self.seed, epoch, 1])
        for index in self.inner:
            yield int(index), int(seeds.integers(0, 2**63))


class MultiClassDataModule(L.LightningDataModule):
    """Training on the normal images of all classes at once; testing per class.

    Args:
        name: Dataset name recorded in results (``mvtec``, ``visa``, ``real`` ...).
        format: ``mvtec``, ``visa``, ``folder`` (any MVTec-layout root) or ``synthetic``.
        root: Dataset root (for ``synthetic``: unused, the data lives under ``cache_dir``).
        classes: Classes to use; ``None`` = all classes of the format (for ``folder``: its
            sub-folders that contain ``train/good``).
        download: Download MVTec AD / VisA into ``root`` if missing.
        sha256: Expected archive digest (overrides the built-in one).
        split_csv: VisA split file relative to ``root``.
        image_size: Images and masks are resized to this square size.
        crop_size: Optional centre crop after resizing (CRR: 448 -> 392).
        batch_size: Training batch size.
        eval_batch_size: Test batch size.
        num_workers: Loader worker processes.
        pin_memory: Pin host memory; ``None`` (default) pins exactly when the trainer runs on a GPU.
        persistent_workers: Keep workers alive between epochs.
        drop_last: Drop the last incomplete training batch (as the official codes do).
        cache_decoded: Cache decoded, resized images on disk under ``cache_dir``.
        cache_dir: Cache folder (decoded images, synthetic data).
        mean: Normalisation mean; ``None`` = the backbone's (set by the training entry point).
        std: Normalisation std; ``None`` = the backbone's.
        sampler: Training order: ``random``, ``class_balanced`` (every class drawn equally often per epoch,
            see :class:`ClassBalancedIndices`) or ``mixed_class`` (random, and every batch holds at least
            two classes; a loss that needs such batches sets :attr:`mixed_batches` on top of any order).
        max_train_per_class: Use only the first N training images of each class (quick runs).
        synthetic: Generation parameters of the synthetic dataset (``num_train``, ``num_test_good``,
            ``num_test_defect``, ``image_size``, ``seed``).
        seed: Seed of the training order, combined with the run's seed.
    """

    def __init__(
        self,
        name: str = "synthetic",
        format: str = "synthetic",
        root: str | None = None,
        classes: list[str] | None = None,
        download: bool = False,
        sha256: str | None = None,
        split_csv: str = "split_csv/1cls.csv",
        image_size: int = 256,
        crop_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        drop_last: bool = True,
        cache_decoded: bool = True,
        cache_dir: str = ".cache",
        mean: list[float] | None = None,
        std: list[float] | None = None,
        sampler: str = "random",
        max_train_per_class: int | None = None,
        synthetic: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise DataError(f"data.format must be one of {FORMATS}, got '{format}'.")
        if format != "synthetic" and not root:
            raise DataError(f"data.root is required for data.format={format} (e.g. data.root=/data/{name}).")
        if sampler not in SAMPLERS:
            raise DataError(f"data.sampler must be one of {SAMPLERS}, got '{sampler}'.")
        if crop_size is not None and crop_size > image_size:
            raise DataError(f"data.crop_size ({crop_size}) must not exceed data.image_size ({image_size}).")
        self.name, self.format, self.root = name, format, root
        self.classes = list(classes) if classes else None
        self.download, self.sha256, self.split_csv = download, sha256, split_csv
        self.image_size, self.crop_size = image_size, crop_size
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last, self.cache_decoded, self.cache_dir = drop_last, cache_decoded, cache_dir
        self.mean, self.std = mean, std
        self.sampler, self.max_train_per_class, self.seed = sampler, max_train_per_class, seed
        self.synthetic = dict(synthetic or {})
        # Set by the training entry point from the method's needs.
        self.synthesizer: Callable | None = None
        self.view_transform_factory: Callable[[int, Sequence[float], Sequence[float]], Any] | None = None
        # The view is cut from the full-resolution file rather than the resized image (CCL, spec E-CCL5).
        self.view_from_original = False
        # Set by a method or loss plug-in that needs batches of two or more classes (CCL): the training order
        # of ``sampler`` (random or class_balanced) is then cut into mixed batches (MixedClassOrder).
        self.mixed_batches = False
        # Labels the mixed-class order mixes (e.g. CCL's k-means pseudo classes); None = the classes.
        self.sampler_labels: Sequence[int] | None = None
        self.train_dataset: AnomalyDataset | None = None
        self.test_dataset: AnomalyDataset | None = None
        self.class_names: list[str] = []
        # The training sampler of the current fit, and the epoch a resumed fit continues from.
        self._train_sampler: EpochSeededSampler | None = None
        self._resume_epoch: int | None = None

    # ----------------------------------------------------------------------------------- records
    @property
    def input_size(self) -> int:
        """Side of the tensors the model receives (after the optional crop)."""
        return self.crop_size or self.image_size

    def _resolve_root(self) -> Path:
        if self.format == "synthetic":
            return generate_synthetic_dataset(
                Path(self.cache_dir) / "datasets",
                classes=tuple(self.classes or SYNTHETIC_CLASSES),
                **self.synthetic,
            )
        root = Path(self.root).expanduser()
        if self.format in ("mvtec", "visa"):
            marker = (root / "bottle" / "train" / "good") if self.format == "mvtec" else (root / self.split_csv)
            if not marker.exists():
                hint = MVTEC_MANUAL if self.format == "mvtec" else VISA_MANUAL
                if not self.download:
                    raise DataError(f"{self.format} data not found under {root}. {hint} Or set data.download=true.")
                url, digest = (MVTEC_URL, MVTEC_SHA256) if self.format == "mvtec" else (VISA_URL, VISA_SHA256)
                download_and_extract(url, root, self.sha256 or digest, hint)
        return root

    def _class_list(self, root: Path) -> list[str]:
        if self.classes:
            return list(self.classes)
        if self.format == "mvtec":
            return list(MVTEC_CLASSES)
        if self.format == "visa":
            return list(VISA_CLASSES)
        return discover_classes(root)

    def records(self, split: str) -> list[SampleRecord]:
        """Samples of ``split`` for the configured classes (resolves/downloads/generates the data)."""
        root = self._resolve_root()
        classes = self._class_list(root)
        if self.format == "visa":
            return visa_records(root, classes, split, self.split_csv)
        return mvtec_layout_records(root, classes, split)

    # ----------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Downloads or generates the data once (rank 0)."""
        self._resolve_root()

    def setup(self, stage: str | None = None) -> None:
        """Lists, validates and (optionally) decodes every file once, then builds the datasets."""
        if self.mean is None or self.std is None:
            raise DataError("Normalisation is unset: give data.mean/data.std or let the backbone set them.")
        root = self._resolve_root()
        self.class_names = self._class_list(root)
        cache = DecodedCache(Path(self.cache_dir) / "decoded", self.image_size) if self.cache_decoded else None
        transform = build_transform(self.crop_size, extra_targets=self.synthesizer is not None)
        normalizer = Normalizer(self.mean, self.std)
        if stage in (None, "fit") and self.train_dataset is None:
            train = self.records("train")
            if self.max_train_per_class:
                seen: dict[str, int] = {}
                kept = []
                for rec in train:
                    seen[rec.class_name] = seen.get(rec.class_name, 0) + 1
                    if seen[rec.class_name] <= self.max_train_per_class:
                        kept.append(rec)
                train = kept
            view = (
                self.view_transform_factory(self.input_size, self.mean, self.std)
                if self.view_transform_factory is not None
                else None
            )
            self.train_dataset = AnomalyDataset(
                train, self.class_names, self.image_size, transform, normalizer, cache, self.synthesizer, view,
                view_from_original=self.view_from_original,
            )  # fmt: skip
            self.train_dataset.validate(decode=cache is None)
            self.train_dataset.prefill_cache()
        if stage in (None, "fit", "test", "predict") and self.test_dataset is None:
            test_transform = build_transform(self.crop_size)
            self.test_dataset = AnomalyDataset(
                self.records("test"), self.class_names, self.image_size, test_transform, normalizer, cache
            )
            self.test_dataset.validate(decode=cache is None)
            self.test_dataset.prefill_cache()

    # ----------------------------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        return {
            "num_workers": self.num_workers,
            "pin_memory": self._pin_memory(trainer),
            "persistent_workers": self.persistent_workers,
            "worker_init_fn": functools.partial(seed_worker, rank=rank) if self.num_workers > 0 else None,
        }

    def _pin_memory(self, trainer: Any) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        # Pinned pages only pay off for host-to-GPU copies; on a CPU run they cost memory and time.
        root_device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return getattr(root_device, "type", "cpu") == "cuda"

    def _sampler_seed(self) -> int:
        # The run's seed (``seed_everything`` exports it, also to spawned processes) combined with data.seed.
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + int(self.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches over all classes, reproducible per ``(seed, epoch)`` (also on resume)."""
        assert self.train_dataset is not None, "call setup('fit') first"
        seed = self._sampler_seed()
        epoch, self._resume_epoch = self._resume_epoch or 0, None
        # The loader's own generator: creating its iterators must not consume the global torch RNG, which
        # a training step may use (dropout, feature noise) and which a resumed run restores.
        generator = torch.Generator().manual_seed(seed)
        class_ids = [self.train_dataset.class_index[r.class_name] for r in self.train_dataset.records]
        order: Sampler[int] = (
            ClassBalancedIndices(class_ids, seed)
            if self.sampler == "class_balanced"
            else ShuffledIndices(len(self.train_dataset), seed)
        )
        if self.sampler == "mixed_class" or self.mixed_batches:
            ids = self.sampler_labels if self.sampler_labels is not None else class_ids
            if self.sampler_labels is None:
                present = sorted({r.class_name for r in self.train_dataset.records})
                if len(present) < 2:
                    # Usually reached first (an LR schedule sizes itself from the loader before fit starts).
                    raise DataError(
                        f"Mixed-class batches (data.sampler=mixed_class) need at least two classes in the training "
                        f"set, which holds only {present}. CCL (loss=ccl) asks for them: with loss.label_source=gt "
                        "its negatives are images of another class, so train on several classes (data.classes), "
                        "or use loss.label_source=kmeans loss.kmeans_clusters=2 (or more)."
                    )
            trainer = getattr(self, "trainer", None)
            world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
            order = MixedClassOrder(ids, self.batch_size, seed, order=order, num_replicas=world)
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        self._train_sampler = EpochSeededSampler(order, seed, epoch)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            drop_last=drop_last,
            generator=generator,
            **self._loader_kwargs(),
        )

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints (written at the end of an epoch): the epoch a resumed run starts with."""
        return {"train_epoch": self._train_sampler.epoch + 1} if self._train_sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores the training sampler's epoch from a checkpoint (used by the next training loader)."""
        if "train_epoch" in state_dict:
            self._resume_epoch = int(state_dict["train_epoch"])

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order (every sample carries its ``index``)."""
        assert self.test_dataset is not None, "call setup('test') first"
        return DataLoader(self.test_dataset, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def predict_dataloader(self) -> DataLoader:
        """Same as the test loader."""
        return self.test_dataloader()
