"""Training orders: reproducible per (seed, epoch), class-balanced, mixed-class, seeded per sample.

Every order here is a pure function of ``(seed, epoch)``, never of the global RNG, loader workers or how
often the loop re-creates its iterators, so a resumed run continues with the batches of an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence, Sized
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Sampler, get_worker_info

from mcad.data.augment import reseed_from_torch
from mcad.data.io import DataError

__all__ = ["ClassBalancedIndices", "EpochSeededSampler", "MixedClassOrder", "ShuffledIndices", "seed_worker"]


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


class EpochOrder(Protocol):
    """An index order of known length whose permutation is chosen per epoch (:class:`ShuffledIndices` ...)."""

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[int]: ...


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
        order: EpochOrder | None = None,
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
        if not isinstance(self.inner, Sized):
            raise TypeError(f"the wrapped sampler {type(self.inner).__name__} has no length")
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
