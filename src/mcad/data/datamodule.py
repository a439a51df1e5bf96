"""One LightningDataModule for multi-class training over every dataset format.

The format (MVTec AD, VisA, MVTec-layout folders, synthetic data, ...) is a declarative record from
:data:`mcad.data.datasets.FORMATS`; what the method needs beyond plain images (a synthesizer, a second view,
mixed-class batches, pseudo labels, the backbone's normalisation) arrives once, as a typed
:class:`~mcad.data.requests.DataRequest`, through :meth:`MultiClassDataModule.configure`, before any loader
is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from mcad.data.augment import contrastive_view_transform
from mcad.data.dataset import AnomalyDataset, DecodedCache, collate_samples
from mcad.data.datasets import FORMATS, DatasetFormat
from mcad.data.geometry import Geometry
from mcad.data.io import DataError
from mcad.data.pseudo_labels import compute_pseudo_labels
from mcad.data.records import SampleRecord
from mcad.data.requests import DataRequest
from mcad.data.samplers import ClassBalancedIndices, EpochSeededSampler, MixedClassOrder, ShuffledIndices, seed_worker
from mcad.data.transforms import Normalizer, Resize, build_transform

__all__ = ["SAMPLERS", "MultiClassDataModule"]

log = logging.getLogger(__name__)

SAMPLERS = ("random", "mixed_class", "class_balanced")
# What a training phase may change for its duration (CRR's stage II trains at batch 8).
_PHASE_SETTINGS = ("batch_size",)


class MultiClassDataModule(L.LightningDataModule):
    """Training on the normal images of all classes at once; testing per class.

    Args:
        name: Dataset name recorded in results (``mvtec``, ``visa``, ``real`` ...).
        format: A key of :data:`mcad.data.datasets.FORMATS` (``mvtec``, ``visa``, ``folder``, ``synthetic``...).
        root: Dataset root (unused by generated formats such as ``synthetic``).
        classes: Classes to use; ``None`` = all classes of the format (for ``folder``: its sub-folders that
            contain ``train/good``).
        download: Download the dataset into ``root`` if missing (formats with a public archive).
        sha256: Expected archive digest (overrides the format's).
        options: Format-specific options (VisA: ``split_csv``; synthetic: its generation parameters).
        image_size: Images and masks are resized to this square size.
        crop_size: Optional centre crop after resizing (CRR: 448 -> 392).
        image_filter: Image resizing filter (``area``, ``pil_bilinear``, ``pil_lanczos``, ``cv2_linear``);
            each paper recipe sets its official code's filter (:mod:`mcad.data.transforms`).
        mask_filter: Mask resizing filter (``cv2_linear``, ``pil_bilinear``, ``nearest``).
        mask_threshold: Binarise masks right after resizing (``>=``, CRR: 0.5); ``None`` = keep grey levels.
        synthesis_filter: Resize filter of the image an image-level synthesizer starts from, when its official
            code resizes it differently from the clean image (CRR: ``cv2_linear``); ``None`` = the clean image.
        geometry: Input geometry (:mod:`mcad.data.geometry`): ``squash`` (default; every paper recipe: resize
            to ``image_size`` square), ``keep_aspect`` (longer side to ``image_size``, padded to square; the
            padding is excluded from evaluation) or ``tile`` (overlapping ``image_size`` tiles of a working
            resolution; training draws one tile per image and epoch, testing stitches all tiles).
        tile_scale: ``tile``: working resolution relative to each image's own size.
        tile_overlap: ``tile``: least fraction of a tile shared by neighbouring tiles.
        tile_max_side: ``tile``: cap of the working resolution's longer side (``None``: no cap).
        batch_size: Training batch size.
        eval_batch_size: Test batch size (images; with ``tile`` also the tiles per forward pass).
        num_workers: Loader worker processes.
        pin_memory: Pin host memory; ``None`` (default) pins exactly when the trainer runs on a GPU.
        persistent_workers: Keep workers alive between epochs.
        drop_last: Drop the last incomplete training batch (as the official codes do).
        cache_decoded: Cache decoded, resized images on disk under ``cache_dir``.
        cache_dir: Cache folder (decoded images, generated data, pseudo labels).
        mean: Normalisation mean; ``None`` = the backbone's (from the run's data request).
        std: Normalisation std; ``None`` = the backbone's.
        sampler: Training order: ``random``, ``class_balanced`` (every class drawn equally often per epoch,
            see :class:`~mcad.data.samplers.ClassBalancedIndices`) or ``mixed_class`` (random, and every batch
            holds at least two classes; a request with ``mixed_batches`` adds this to any order).
        max_train_per_class: Use only the first N training images of each class (quick runs).
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
        options: dict[str, Any] | None = None,
        image_size: int = 256,
        crop_size: int | None = None,
        image_filter: str = "area",
        mask_filter: str = "cv2_linear",
        mask_threshold: float | None = None,
        synthesis_filter: str | None = None,
        geometry: str = "squash",
        tile_scale: float = 1.0,
        tile_overlap: float = 0.25,
        tile_max_side: int | None = None,
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
        seed: int = 0,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise DataError(f"data.format must be one of {tuple(FORMATS)}, got '{format}'.")
        if sampler not in SAMPLERS:
            raise DataError(f"data.sampler must be one of {SAMPLERS}, got '{sampler}'.")
        if crop_size is not None and crop_size > image_size:
            raise DataError(f"data.crop_size ({crop_size}) must not exceed data.image_size ({image_size}).")
        self.dataset_format: DatasetFormat = FORMATS[format]
        self.name, self.format, self.root = name, format, root
        self.options = self.dataset_format.resolve_options(options)
        if self.dataset_format.generate is None and not root:
            raise DataError(f"data.root is required for data.format={format} (e.g. data.root=/data/{name}).")
        self.classes = list(classes) if classes else None
        self.download, self.sha256 = download, sha256
        try:
            self.geometry = Geometry(geometry, image_size, crop_size, tile_scale, tile_overlap, tile_max_side)
            # squash keeps the geometry-free resize (and its cache keys) of every earlier run.
            shaped = self.geometry if geometry != "squash" else None
            self.resize = Resize(image_size, image_filter, mask_filter, mask_threshold, shaped)
        except ValueError as err:
            raise DataError(str(err)) from err
        self.crop_size = crop_size
        self.synthesis_filter = synthesis_filter
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.drop_last, self.cache_decoded, self.cache_dir = drop_last, cache_decoded, cache_dir
        self.mean, self.std = mean, std
        self.sampler, self.max_train_per_class, self.seed = sampler, max_train_per_class, seed
        self.request = DataRequest()
        self.train_dataset: AnomalyDataset | None = None
        self.test_dataset: AnomalyDataset | None = None
        self.class_names: list[str] = []
        #: How the contrast labels were made (``results.json`` ``class_labels``); ``None`` without a contrastive loss.
        self.contrast_label_info: dict[str, Any] | None = None
        # The training sampler of the current fit, and the epoch a resumed fit continues from.
        self._train_sampler: EpochSeededSampler | None = None
        self._resume_epoch: int | None = None

    # ----------------------------------------------------------------------------------- the request
    def configure(self, request: DataRequest) -> None:
        """Takes the run's data request (method and plug-in merged); call once, before ``setup``.

        Raises:
            RuntimeError: The datasets are already built (the request would not reach them).
        """
        if self.train_dataset is not None or self.test_dataset is not None:
            raise RuntimeError("MultiClassDataModule.configure must be called before setup (datasets exist).")
        self.request = request
        if (self.mean is None or self.std is None) and request.normalization is not None:
            self.mean, self.std = [list(v) for v in request.normalization]

    @contextlib.contextmanager
    def phase_settings(self, **settings: Any) -> Iterator[None]:
        """Changes loader settings (``batch_size``) for one training phase, restoring them afterwards."""
        unknown = sorted(set(settings) - set(_PHASE_SETTINGS))
        if unknown:
            raise ValueError(f"A training phase may only change {_PHASE_SETTINGS}, not {unknown}.")
        saved = {key: getattr(self, key) for key in settings}
        for key, value in settings.items():
            setattr(self, key, value)
        try:
            yield
        finally:
            for key, value in saved.items():
                setattr(self, key, value)

    # ----------------------------------------------------------------------------------- records
    @property
    def image_size(self) -> int:
        """Side of the images after resizing (before the optional crop)."""
        return self.resize.size

    @property
    def input_size(self) -> int:
        """Side of the tensors the model receives (after the optional crop)."""
        return self.crop_size or self.image_size

    def _resolve_root(self) -> Path:
        return self.dataset_format.locate(
            self.root, self.options, Path(self.cache_dir), self.classes, download=self.download, sha256=self.sha256
        )

    def records(self, split: str) -> list[SampleRecord]:
        """Samples of ``split`` for the configured classes (resolves/downloads/generates the data)."""
        root = self._resolve_root()
        classes = self.dataset_format.class_names(root, self.classes)
        return self.dataset_format.list_records(root, classes, split, self.options)

    # ----------------------------------------------------------------------------------- setup
    def prepare_data(self) -> None:
        """Downloads or generates the data once (rank 0)."""
        self._resolve_root()

    def setup(self, stage: str | None = None) -> None:
        """Lists, validates and (optionally) decodes every file once, then builds the datasets.

        Pseudo labels asked for by the request are computed here, so they exist before any loader (an LR
        schedule sizes itself from the training loader before ``on_fit_start``).
        """
        if self.mean is None or self.std is None:
            raise DataError("Normalisation is unset: give data.mean/data.std or let the backbone set them.")
        root = self._resolve_root()
        self.class_names = self.dataset_format.class_names(root, self.classes)
        cache = DecodedCache(Path(self.cache_dir) / "decoded", self.resize) if self.cache_decoded else None
        normalizer = Normalizer(self.mean, self.std)
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._train_dataset(cache, normalizer)
        if stage in (None, "fit", "test", "predict") and self.test_dataset is None:
            self.test_dataset = self.inference_dataset(self.records("test"), self.class_names, cache)
            self.test_dataset.validate(decode=cache is None)
            self.test_dataset.prefill_cache()

    def inference_dataset(
        self, records: list[SampleRecord], class_names: list[str], cache: DecodedCache | None = None
    ) -> AnomalyDataset:
        """The test pipeline over any records (the test split, or unlabelled images for ``mcad-predict``)."""
        if self.mean is None or self.std is None:
            raise DataError("Normalisation is unset: give data.mean/data.std or let the backbone set them.")
        return AnomalyDataset(
            records, class_names, self.resize, build_transform(self.crop_size), Normalizer(self.mean, self.std),
            cache, geometry=self.geometry, tile_batch=self.eval_batch_size,
        )  # fmt: skip

    @property
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]] | None:
        """The test loaders' collate function: tiled images of different sizes are batched as lists."""
        return collate_samples if self.geometry.kind == "tile" else None

    def _train_dataset(self, cache: DecodedCache | None, normalizer: Normalizer) -> AnomalyDataset:
        request = self.request
        records = self.records("train")
        if self.max_train_per_class:
            seen: dict[str, int] = {}
            kept = []
            for rec in records:
                seen[rec.class_name] = seen.get(rec.class_name, 0) + 1
                if seen[rec.class_name] <= self.max_train_per_class:
                    kept.append(rec)
            records = kept
        view = request.second_view
        view_transform = None
        if view is not None:
            assert self.mean is not None and self.std is not None
            view_transform = contrastive_view_transform(
                self.input_size, self.mean, self.std, crop_scale=view.crop_scale, rotate_limit=view.rotate_limit,
                blur_kernel=view.blur_kernel, seed=int(torch.initial_seed() % 2**32),
            )  # fmt: skip
        dataset = AnomalyDataset(
            records, self.class_names, self.resize, build_transform(self.crop_size, request.synthesizer is not None),
            normalizer, cache, request.synthesizer, view_transform,
            view_from_original=view is not None and view.from_original, synthesis_filter=self.synthesis_filter,
            geometry=self.geometry, draw_tiles=True,
        )  # fmt: skip
        dataset.validate(decode=cache is None)
        dataset.prefill_cache()
        if request.pseudo_labels is not None:
            labels, info = compute_pseudo_labels(
                [r.image_path for r in records], dataset.class_ids.tolist(), request.pseudo_labels, self._device()
            )
            log.info("Pseudo labels: k-means (k=%d) on %s features of %d training images; adjusted Rand index "
                     "against the classes = %.4f; cluster sizes %s", info["num_clusters"], info["features"],
                     len(labels), info["adjusted_rand_index"], info["cluster_sizes"])  # fmt: skip
            dataset.contrast_labels = labels
            self.contrast_label_info = info
        elif request.second_view is not None or request.mixed_batches:
            self.contrast_label_info = {"source": "gt", "num_classes": len(set(dataset.class_ids.tolist()))}
        return dataset

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return device if isinstance(device, torch.device) else torch.device("cpu")

    # ----------------------------------------------------------------------------------- loaders
    def _loader_kwargs(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        rank = int(getattr(trainer, "global_rank", 0) or 0) if trainer is not None else 0
        return {
            "num_workers": self.num_workers,
            "pin_memory": self._pin_memory(),
            "persistent_workers": self.persistent_workers,
            "worker_init_fn": functools.partial(seed_worker, rank=rank) if self.num_workers > 0 else None,
        }

    def _pin_memory(self) -> bool:
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        # Pinned pages only pay off for host-to-GPU copies; on a CPU run they cost memory and time.
        return self._device().type == "cuda"

    def _sampler_seed(self) -> int:
        # The run's seed (``seed_everything`` exports it, also to spawned processes) combined with data.seed.
        return int(os.environ.get("PL_GLOBAL_SEED", 0)) * 1_000_003 + int(self.seed)

    def _order(self, seed: int) -> Sampler[int]:
        assert self.train_dataset is not None
        dataset = self.train_dataset
        order: ClassBalancedIndices | ShuffledIndices = (
            ClassBalancedIndices(dataset.class_ids.tolist(), seed)
            if self.sampler == "class_balanced"
            else ShuffledIndices(len(dataset), seed)
        )
        if self.sampler != "mixed_class" and not self.request.mixed_batches:
            return order
        if len(set(dataset.contrast_labels.tolist())) < 2:
            present = sorted({r.class_name for r in dataset.records})
            raise DataError(
                f"Mixed-class batches need at least two classes in the training set, which holds only {present}. "
                "CCL (loss=ccl) asks for them: with loss.label_source=gt its negatives are images of another "
                "class, so train on several classes (data.classes), or use loss.label_source=kmeans "
                "loss.kmeans_clusters=2 (or more)."
            )
        trainer = getattr(self, "trainer", None)
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        # Mix what the contrastive terms see: classes, or pseudo classes.
        return MixedClassOrder(dataset.contrast_labels.tolist(), self.batch_size, seed, order=order, num_replicas=world)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches over all classes, reproducible per ``(seed, epoch)`` (also on resume)."""
        assert self.train_dataset is not None, "call setup('fit') first"
        seed = self._sampler_seed()
        epoch, self._resume_epoch = self._resume_epoch or 0, None
        # The loader's own generator: creating its iterators must not consume the global torch RNG, which
        # a training step may use (dropout, feature noise) and which a resumed run restores.
        generator = torch.Generator().manual_seed(seed)
        drop_last = self.drop_last and len(self.train_dataset) >= self.batch_size
        self._train_sampler = EpochSeededSampler(self._order(seed), seed, epoch)
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
        return DataLoader(self.test_dataset, batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate_fn, **self._loader_kwargs())  # fmt: skip

    def predict_dataloader(self) -> DataLoader:
        """Same as the test loader."""
        return self.test_dataloader()
