"""Per-class, DDP-correct accumulator of the seven anomaly-detection metrics, in bounded memory.

The accumulator stores per-sample results (image score, label, class id, test-set index and, for pixel
metrics, the post-processed anomaly map and the binarised ground-truth mask) and computes the exact
metrics of :mod:`mcad.metrics.functional` per class at :meth:`AnomalyMetricAccumulator.compute`.

Storage choice and error:

* maps are stored as ``float32`` by default: the metrics are then *exact* for the maps the method
  produced (no quantisation; the engine has no binning). ``map_dtype=torch.float16`` halves the storage
  but rounds scores to 11 significant bits, which creates ties and changes rankings; on the MVTec-sized
  case of ``experiments/bench_metrics.py`` it moves pixel metrics by up to 7.5e-4 (reported there as
  max |float16 - float32|), outside the 1e-4 guarantee, so it is opt-in. The metrics are still exact for
  the rounded maps. Values above 65504 overflow to ``inf`` in float16 (a warning is emitted).
* masks are stored as ``uint8`` {0, 1}, image scores as ``float64``, labels as ``uint8``.

No sigmoid or any other transformation is ever applied to the scores.

Bounded memory: maps and masks are kept in host memory (never in accelerator memory) while they take at
most :attr:`AnomalyMetricAccumulator.memory_budget` bytes; beyond that they are *spilled*: appended, per
class, to temporary files that have no name in the file system (``O_TMPFILE`` / unlinked at creation), so
they vanish when the accumulator is reset, garbage-collected or the process ends, even on an exception or a
``SIGKILL``. The budget is automatic (:func:`default_memory_budget`: at most 128 MiB and 1/16 of the
available RAM), so the peak memory of an evaluation does not depend on the test-set size: ``compute``
materialises one class at a time (its maps and masks, ~5 bytes per pixel, plus one sorted copy of its
scores, 4 bytes per pixel) and computes it with the exact engine. Results do not depend on where the rows
were stored: the spilled path gives bit-identical metrics. The files go to ``spill_dir`` (default: the
system temporary directory, i.e. ``$TMPDIR`` or ``/tmp``); if that is a RAM-backed ``tmpfs``, point it
at a disk. Tests force spilling with ``memory_budget=0`` or the environment variable
``MCAD_ACCUMULATOR_MEMORY_BUDGET`` (bytes; meant for tests and debugging, it overrides the automatic
budget of every accumulator built without an explicit ``memory_budget``).

Distributed evaluation: torchmetrics gathers the small per-sample states (scores, labels, class ids,
indices) with ``cat``. Maps and masks are gathered class by class in blocks of at most 64 MiB per rank
(each rank sends its stored rows of that class, padded to the largest rank's count), so no process ever
holds more than one class of maps. Samples that a distributed sampler duplicated (to give every rank the
same count) carry the same ``index``; only the first occurrence of each index (in rank order) is kept and
samples are processed in ascending index order, so N processes give bit-identical numbers to one process.
"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import IO, Any

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torchmetrics
from torch import Tensor

from mcad.metrics._table import (
    IMAGE_METRICS,
    METRIC_NAMES,
    PIXEL_METRICS,
    class_row,
    compute_metrics,
    dedup_order,
    flat_numpy,
    table_means,
)

__all__ = [
    "IMAGE_METRICS",
    "MEMORY_BUDGET_ENV",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "AnomalyMetricAccumulator",
    "compute_metrics",
    "default_memory_budget",
]

_MAP_DTYPES: dict[torch.dtype, type[np.floating]] = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.float64: np.float64,
}

MEMORY_BUDGET_ENV = "MCAD_ACCUMULATOR_MEMORY_BUDGET"
# In-memory cap of the stored maps + masks. Spilling costs little (the files are written and read back
# through the page cache when RAM is plentiful), while memory held through a whole test epoch is taken
# from everything else (loader workers, the model), so the cap is small: ~400 maps of 256x256.
_MAX_IN_MEMORY_BYTES = 128 * 2**20
_RAM_FRACTION = 16
# Staging memory grows in blocks of this size (allocated on demand, reused after each spill).
_BLOCK_BYTES = 16 * 2**20
# Per-rank payload of one all_gather round of a class's maps under DDP.
_GATHER_BLOCK_BYTES = 64 * 2**20
# Linux transfers at most 0x7ffff000 bytes per read/write call.
_IO_CHUNK = 1 << 30


def default_memory_budget() -> int:
    """The automatic in-memory budget of the stored maps and masks, in bytes.

    Returns:
        ``$MCAD_ACCUMULATOR_MEMORY_BUDGET`` if set (tests/debugging), else
        ``min(128 MiB, available RAM / 16)``.

    Raises:
        ValueError: If the environment variable is not a non-negative integer.
    """
    env = os.environ.get(MEMORY_BUDGET_ENV)
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            value = -1
        if value < 0:
            raise ValueError(f"{MEMORY_BUDGET_ENV} must be a non-negative integer (bytes), got {env!r}")
        return value
    return int(min(_MAX_IN_MEMORY_BYTES, psutil.virtual_memory().available // _RAM_FRACTION))


def _segments(src: np.ndarray, dst: np.ndarray) -> list[tuple[int, int, int]]:
    """Split aligned row positions into ``(src_start, dst_start, length)`` runs consecutive in both."""
    if src.size == 0:
        return []
    cuts = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], cuts))
    lengths = np.diff(np.append(starts, src.size))
    return [(int(src[a]), int(dst[a]), int(k)) for a, k in zip(starts, lengths)]


Rows = np.ndarray | Tensor  # a batch of maps or masks: a host array, or a tensor that NumPy cannot view


def _host(x: Tensor) -> Rows:
    """A NumPy view of a host tensor; device (and bfloat16) tensors stay tensors.

    NumPy is used for every full-size pass over a batch on the host: torch's multi-threaded kernels were
    ~10x slower for these copies and reductions on a loaded 2-core machine.
    """
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:
        return x.numpy()
    return x


def _copy_rows(dst: np.ndarray, src: Rows) -> None:
    """Copy (and convert) ``src`` into the host array ``dst``; from an accelerator in one transfer."""
    if isinstance(src, np.ndarray):
        np.copyto(dst, src, casting="unsafe")
    else:
        torch.from_numpy(dst).copy_(src)


def _write_all(fd: int, data: np.ndarray, path_hint: str) -> None:
    """Append the bytes of C-contiguous ``data`` to ``fd`` (a raw write may be partial)."""
    view = data.reshape(-1).data.cast("B")  # ndarray.data: the array's buffer as a memoryview
    try:
        while view.nbytes:
            n = os.write(fd, view[:_IO_CHUNK])
            view = view[n:]
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                err.errno,
                f"no space left in {path_hint} to spill the evaluation maps; pass spill_dir= (or set TMPDIR) "
                "to a larger disk",
            ) from err
        raise


def _read_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill C-contiguous ``out`` with the bytes of ``fd`` from ``offset`` on."""
    view = out.reshape(-1).data.cast("B")  # ndarray.data: the array's buffer as a memoryview
    while view.nbytes:
        n = os.preadv(fd, [view[:_IO_CHUNK]], offset)
        if n == 0:
            raise OSError(errno.EIO, "spill file is shorter than expected")
        view, offset = view[n:], offset + n


class _PixelStore:
    """Maps and masks per class: in-memory staging up to a byte budget, then append-only files per class.

    Rows of a class are kept in arrival order ("store order"): its rows on disk (in append order), then its
    rows still in memory. A spill writes every staged row to its class's files, so this order is preserved.
    """

    def __init__(self, n_classes: int, dtype: type[np.floating], budget: int, spill_dir: str | None) -> None:
        self.n_classes = n_classes
        self.dtype = np.dtype(dtype)
        self.budget = budget
        self.spill_dir = spill_dir
        self.spatial: tuple[int, int] | None = None
        self._clear()

    def _clear(self) -> None:
        self._map_blocks: list[np.ndarray] = []
        self._mask_blocks: list[np.ndarray] = []
        self._block_rows = 1
        self._capacity = 0
        self._slot_class = np.zeros(0, dtype=np.int64)
        self._slot_index = np.zeros(0, dtype=np.int64)
        self._fill = 0
        self._files: list[tuple[IO[bytes], IO[bytes]] | None] = [None] * self.n_classes
        self._disk_rows = np.zeros(self.n_classes, dtype=np.int64)
        self._disk_index: list[list[np.ndarray]] = [[] for _ in range(self.n_classes)]
        self._failed: str | None = None

    # ------------------------------------------------------------------ sizes
    @property
    def map_row_bytes(self) -> int:
        return 0 if self.spatial is None else self.spatial[0] * self.spatial[1] * self.dtype.itemsize

    @property
    def mask_row_bytes(self) -> int:
        return 0 if self.spatial is None else self.spatial[0] * self.spatial[1]

    @property
    def row_bytes(self) -> int:
        return self.map_row_bytes + self.mask_row_bytes

    @property
    def bytes_in_memory(self) -> int:
        return self._fill * self.row_bytes

    @property
    def bytes_on_disk(self) -> int:
        return int(self._disk_rows.sum()) * self.row_bytes

    @property
    def open_files(self) -> int:
        return 2 * sum(f is not None for f in self._files)

    def counts(self) -> np.ndarray:
        """``(n_classes,)`` stored rows per class (duplicates included)."""
        staged = np.bincount(self._slot_class[: self._fill], minlength=self.n_classes)
        return self._disk_rows + staged

    # ------------------------------------------------------------------ writing
    def add(self, maps: Rows, masks: Rows, class_ids: np.ndarray, indices: np.ndarray) -> None:
        """Append a batch of ``(B, H, W)`` maps and {0, 1} masks (host arrays, or tensors on any device)."""
        self._check_usable()
        if self.spatial is None:
            self.spatial = (int(maps.shape[1]), int(maps.shape[2]))
            self._block_rows = max(1, _BLOCK_BYTES // self.row_bytes)
            self._capacity = max(1, self.budget // self.row_bytes)
            self._slot_class = np.zeros(self._capacity, dtype=np.int64)
            self._slot_index = np.zeros(self._capacity, dtype=np.int64)
        done, b = 0, int(maps.shape[0])
        while done < b:
            if self._fill == self._capacity:
                self.spill()
            block, row = divmod(self._fill, self._block_rows)
            if block == len(self._map_blocks):
                rows = min(self._block_rows, self._capacity - block * self._block_rows)
                self._map_blocks.append(np.empty((rows, *self.spatial), dtype=self.dtype))
                self._mask_blocks.append(np.empty((rows, *self.spatial), dtype=np.uint8))
            k = min(b - done, self._map_blocks[block].shape[0] - row)
            _copy_rows(self._map_blocks[block][row : row + k], maps[done : done + k])
            _copy_rows(self._mask_blocks[block][row : row + k], masks[done : done + k])
            self._slot_class[self._fill : self._fill + k] = class_ids[done : done + k]
            self._slot_index[self._fill : self._fill + k] = indices[done : done + k]
            self._fill += k
            done += k
        if self.bytes_in_memory > self.budget:  # only when the budget is below one row
            self.spill()

    def _slots(self, c: int) -> np.ndarray:
        return np.flatnonzero(self._slot_class[: self._fill] == c)

    def _staged(self, slots: np.ndarray, out_rows: np.ndarray, out_maps: np.ndarray, out_masks: np.ndarray) -> None:
        """Copy staged rows ``slots`` into rows ``out_rows`` of ``out_*`` (aligned), block by block."""
        block, row = np.divmod(slots, self._block_rows)
        for bl in np.unique(block):
            sel = np.flatnonzero(block == bl)
            for r0, o0, k in _segments(row[sel], out_rows[sel]):
                out_maps[o0 : o0 + k] = self._map_blocks[bl][r0 : r0 + k]
                out_masks[o0 : o0 + k] = self._mask_blocks[bl][r0 : r0 + k]

    def spill(self) -> None:
        """Move every staged row to the end of its class's files (the staging blocks are kept for reuse)."""
        try:
            self._spill()
        except BaseException as err:
            # A partial spill leaves rows both staged and on disk: refuse to go on rather than guess.
            self._failed = f"{type(err).__name__}: {err}"
            raise

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"spilling the maps to disk failed earlier ({self._failed}); reset() the accumulator")

    def _spill(self) -> None:
        hint = self.spill_dir or tempfile.gettempdir()
        for c in np.unique(self._slot_class[: self._fill]):
            c = int(c)
            slots = self._slots(c)
            files = self._files[c]
            if files is None:
                # No name in the file system: the space is freed when the file is closed, whatever happens.
                # The files live as long as the store (closed by close()), hence no context manager.
                files = (
                    tempfile.TemporaryFile(dir=self.spill_dir, prefix="mcad-maps-", buffering=0),  # noqa: SIM115
                    tempfile.TemporaryFile(dir=self.spill_dir, prefix="mcad-masks-", buffering=0),  # noqa: SIM115
                )
                self._files[c] = files
            map_file, mask_file = files
            block, row = np.divmod(slots, self._block_rows)
            for bl in np.unique(block):
                rows = row[block == bl]
                for r0, _, k in _segments(rows, rows):
                    _write_all(map_file.fileno(), self._map_blocks[bl][r0 : r0 + k], hint)
                    _write_all(mask_file.fileno(), self._mask_blocks[bl][r0 : r0 + k], hint)
            self._disk_index[c].append(self._slot_index[slots].copy())
            self._disk_rows[c] += slots.size
        self._fill = 0

    # ------------------------------------------------------------------ reading
    def class_indices(self, c: int) -> np.ndarray:
        """Test indices of the rows of class ``c``, in store order."""
        self._check_usable()
        return np.concatenate([*self._disk_index[c], self._slot_index[self._slots(c)]])

    def read(self, c: int, positions: np.ndarray, out_maps: np.ndarray, out_masks: np.ndarray) -> None:
        """Rows ``positions`` (store order of class ``c``, any order) into C-contiguous ``out_*`` (aligned)."""
        n_disk = int(self._disk_rows[c])
        on_disk = positions < n_disk
        out_rows = np.flatnonzero(on_disk)
        if out_rows.size:
            files = self._files[c]
            assert files is not None  # rows on disk were written to the class's files
            map_fd, mask_fd = (f.fileno() for f in files)
            # Runs of consecutive positions that land in consecutive output rows: one read each.
            for p0, o0, k in _segments(positions[out_rows], out_rows):
                _read_into(map_fd, out_maps[o0 : o0 + k], p0 * self.map_row_bytes)
                _read_into(mask_fd, out_masks[o0 : o0 + k], p0 * self.mask_row_bytes)
        out_rows = np.flatnonzero(~on_disk)
        if out_rows.size:
            self._staged(self._slots(c)[positions[out_rows] - n_disk], out_rows, out_maps, out_masks)

    def close(self) -> None:
        """Drop every row and close (hence delete) the spill files."""
        for files in self._files:
            if files is not None:
                for f in files:
                    f.close()
        self.spatial = None
        self._clear()

    def __getstate__(self) -> dict[str, Any]:
        if self.open_files:
            raise TypeError("an accumulator whose maps were spilled to disk cannot be copied or pickled")
        return self.__dict__.copy()


class _ClassGather:
    """Gathers one class of maps/masks at a time from every rank of a process group (see module docs)."""

    def __init__(self, store: _PixelStore, group: dist.ProcessGroup | None) -> None:
        self.store = store
        self.group = group
        self.world = dist.get_world_size(group)
        # NCCL only moves accelerator tensors; gloo (and others) move host tensors.
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        h, w = store.spatial or (0, 0)
        local = torch.tensor([h, w, *store.counts().tolist()], dtype=torch.int64)
        table = torch.stack(self._all_gather(local)).numpy()
        shapes = {(int(a), int(b)) for a, b in table[:, :2] if a}
        if len(shapes) > 1:
            raise ValueError(f"ranks stored maps of different sizes {sorted(shapes)}; evaluate at one resolution")
        self.spatial = shapes.pop() if shapes else (0, 0)
        self.counts = table[:, 2:]  # (world, n_classes)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        t = t.to(self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return [o.cpu() for o in out]

    def class_rows(self, c: int, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The de-duplicated maps and masks of class ``c`` in ascending index order (``want``)."""
        n = self.counts[:, c]
        m = int(n.max())
        local = self.store.class_indices(c) if self.store.spatial is not None else np.zeros(0, np.int64)
        send = np.full(m, -1, dtype=np.int64)
        send[: local.size] = local
        got = self._all_gather(torch.from_numpy(send))
        all_idx = np.concatenate([g.numpy()[: n[r]] for r, g in enumerate(got)])
        unique, first = np.unique(all_idx, return_index=True)
        _check_rows(c, unique, want)
        dest = np.full(all_idx.size, -1, dtype=np.int64)
        dest[first] = np.arange(unique.size)  # only the first occurrence (rank order) of an index is kept
        offsets = np.concatenate(([0], np.cumsum(n)))
        out_maps = np.empty((unique.size, *self.spatial), dtype=self.store.dtype)
        out_masks = np.empty((unique.size, *self.spatial), dtype=np.uint8)
        h, w = self.spatial
        step = max(1, _GATHER_BLOCK_BYTES // (h * w * (self.store.dtype.itemsize + 1)))
        send_maps = np.zeros((min(step, m), h, w), dtype=self.store.dtype)
        send_masks = np.zeros((min(step, m), h, w), dtype=np.uint8)
        for b in range(0, m, step):
            k = min(step, m - b)
            mine = max(0, min(local.size - b, k))
            if mine:
                self.store.read(c, np.arange(b, b + mine), send_maps[:mine], send_masks[:mine])
            # Rows beyond `mine` are padding (stale contents); the receivers ignore them.
            recv_maps = self._all_gather(torch.from_numpy(send_maps[:k]))
            recv_masks = self._all_gather(torch.from_numpy(send_masks[:k]))
            for r in range(self.world):
                valid = max(0, min(int(n[r]) - b, k))
                d = dest[offsets[r] + b : offsets[r] + b + valid]
                keep = d >= 0
                out_maps[d[keep]] = recv_maps[r].numpy()[:valid][keep]
                out_masks[d[keep]] = recv_masks[r].numpy()[:valid][keep]
            del recv_maps, recv_masks
        return out_maps, out_masks


def _outside_01(masks: Rows) -> bool:
    """Whether a non-empty bool/integer mask batch holds values other than 0 and 1."""
    if masks.dtype == (np.bool_ if isinstance(masks, np.ndarray) else torch.bool):
        return False
    if masks.dtype == (np.uint8 if isinstance(masks, np.ndarray) else torch.uint8):
        return bool(masks.max() > 1)
    return bool(masks.min() < 0 or masks.max() > 1)


def _check_rows(c: int, stored: np.ndarray, want: np.ndarray) -> None:
    if not np.array_equal(stored, want):
        raise RuntimeError(
            f"class {c}: the stored maps ({stored.size} test indices) do not match the stored image scores "
            f"({want.size}); was an update interrupted?"
        )


class AnomalyMetricAccumulator(torchmetrics.Metric):
    """Accumulates per-sample results and computes the per-class metric table (exact, DDP-correct).

    Example:
        >>> acc = AnomalyMetricAccumulator(["bottle", "cable"])
        >>> acc.update(scores, labels, class_ids, indices, maps, masks)  # once per test batch
        >>> table = acc.compute()  # {"per_class": {...}, "mean": {..., "mAD": ...}}
        >>> acc.reset()  # frees the stored maps (and deletes the spill files)

    Args:
        class_names: Category names; ``class_ids`` passed to :meth:`update` index into them.
        fpr_limit: AUPRO integration limit.
        map_dtype: Storage dtype of the maps: ``torch.float32`` (default, exact), ``torch.float16``
            (half the storage, rounds scores; opt-in) or ``torch.float64``.
        pixel_metrics: Store maps/masks and compute the pixel metrics (P-AUROC, P-AP, P-F1max, AUPRO).
        memory_budget: Bytes of maps + masks kept in host memory before they are spilled to disk; None
            (default) chooses it automatically (:func:`default_memory_budget`). ``0`` spills every batch.
        spill_dir: Directory of the (nameless) spill files; None uses the system temporary directory.
        **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``process_group``, or
            ``compute_on_cpu=True`` to keep the small states in host memory: fine for one process or a gloo
            group, but NCCL cannot gather CPU tensors).

    Memory: per stored pixel 4 bytes (float32 map) + 1 byte (mask), of which at most ``memory_budget`` bytes
    stay in RAM (the rest on disk). ``compute`` materialises one class at a time (~5 bytes per pixel of that
    class plus one sorted copy of its scores); under DDP it also holds one gather round (64 MiB per rank).

    Raises:
        ValueError: On empty or repeated class names, an unsupported ``map_dtype``, ``fpr_limit`` outside
            (0, 1] or a negative ``memory_budget``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_scores: list[Tensor]
    labels: list[Tensor]
    class_ids: list[Tensor]
    indices: list[Tensor]

    def __init__(
        self,
        class_names: Sequence[str],
        fpr_limit: float = 0.3,
        map_dtype: torch.dtype = torch.float32,
        pixel_metrics: bool = True,
        memory_budget: int | None = None,
        spill_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
        if map_dtype not in _MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {tuple(_MAP_DTYPES)}, got {map_dtype}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        budget = default_memory_budget() if memory_budget is None else int(memory_budget)
        if budget < 0:
            raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")
        self.class_names = tuple(class_names)
        self.fpr_limit = float(fpr_limit)
        self.map_dtype = map_dtype
        self.pixel_metrics = bool(pixel_metrics)
        self.memory_budget = budget
        for name in ("image_scores", "labels", "class_ids", "indices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._store = _PixelStore(
            len(self.class_names),
            _MAP_DTYPES[map_dtype],
            budget,
            None if spill_dir is None else os.fspath(spill_dir),
        )

    # ------------------------------------------------------------------ observability of the storage
    @property
    def spilled(self) -> bool:
        """Whether any map is stored on disk (the stored maps exceeded :attr:`memory_budget`)."""
        return self._store.bytes_on_disk > 0

    @property
    def bytes_in_memory(self) -> int:
        """Bytes of maps + masks currently held in RAM (at most :attr:`memory_budget`, or one row)."""
        return self._store.bytes_in_memory

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of maps + masks in the spill files."""
        return self._store.bytes_on_disk

    @property
    def spill_files(self) -> int:
        """Number of open spill files (two per class that spilled; 0 after :meth:`reset`)."""
        return self._store.open_files

    # ------------------------------------------------------------------ metric API
    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        class_ids: Tensor,
        indices: Tensor,
        anomaly_maps: Tensor | None = None,
        gt_masks: Tensor | None = None,
    ) -> None:
        """Store one batch (all of it, or nothing if it is invalid).

        Args:
            image_scores: ``(B,)`` float image scores, any real values.
            labels: ``(B,)`` int/bool image labels, 0 normal / 1 anomalous.
            class_ids: ``(B,)`` int, index into ``class_names``.
            indices: ``(B,)`` int, position of each sample in the test set (unique per sample).
            anomaly_maps: ``(B, H, W)`` (or ``(B, 1, H, W)``) post-processed maps at evaluation resolution;
                required when ``pixel_metrics`` is True, ignored otherwise.
            gt_masks: ``(B, H, W)`` (or ``(B, 1, H, W)``) binarised masks, bool or integer {0, 1}.

        Raises:
            ValueError: On inconsistent batch sizes/shapes, out-of-range class ids, non-binary labels or
                masks, or floating-point masks (binarise with the protocol's ``gt_threshold`` first).
            OSError: If the spill directory runs out of space.
        """
        scores = image_scores.detach().reshape(-1)
        b = scores.numel()
        lab = labels.detach().reshape(-1)
        cls = class_ids.detach().reshape(-1)
        idx = indices.detach().reshape(-1)
        if not (lab.numel() == cls.numel() == idx.numel() == b):
            raise ValueError(
                f"batch sizes differ: scores {b}, labels {lab.numel()}, class_ids {cls.numel()}, indices {idx.numel()}"
            )
        if lab.is_floating_point() or cls.is_floating_point() or idx.is_floating_point():
            raise ValueError("labels, class_ids and indices must be integer (or bool) tensors")
        if b and ((lab != 0) & (lab != 1)).any():
            raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
        if b and (cls.min() < 0 or cls.max() >= len(self.class_names)):
            raise ValueError(f"class_ids must be in [0, {len(self.class_names)})")
        if self.pixel_metrics:
            maps, masks = self._checked_pixels(anomaly_maps, gt_masks, b)
            # Stored before the small states: a failed write (disk full) leaves no scores without maps.
            self._store.add(maps, masks, cls.cpu().numpy(), idx.cpu().numpy())
        self.image_scores.append(scores.to(torch.float64))
        self.labels.append(lab.to(torch.uint8))
        self.class_ids.append(cls.to(torch.int64))
        self.indices.append(idx.to(torch.int64))

    def _checked_pixels(self, anomaly_maps: Tensor | None, gt_masks: Tensor | None, b: int) -> tuple[Rows, Rows]:
        """Validated ``(B, H, W)`` maps (in the storage dtype for float16) and masks of a batch."""
        if anomaly_maps is None or gt_masks is None:
            raise ValueError("anomaly_maps and gt_masks are required when pixel_metrics=True")
        maps = self._spatial(anomaly_maps.detach(), b, "anomaly_maps")
        masks = self._spatial(gt_masks.detach(), b, "gt_masks")
        if maps.shape != masks.shape:
            raise ValueError(f"anomaly_maps {tuple(maps.shape)} and gt_masks {tuple(masks.shape)} differ")
        spatial = self._store.spatial
        if spatial is not None and spatial != tuple(maps.shape[1:]):
            raise ValueError(
                f"map size {tuple(maps.shape[1:])} differs from earlier batches {spatial}; evaluate at one resolution"
            )
        if masks.is_floating_point():
            raise ValueError("gt_masks must be bool or integer {0, 1}; binarise with the protocol's gt_threshold")
        host_maps, host_masks = _host(maps), _host(masks)
        if b and _outside_01(host_masks):
            raise ValueError("gt_masks must contain only 0 and 1")
        if self.map_dtype == torch.float16:
            rounded: Rows
            if isinstance(host_maps, np.ndarray):
                with np.errstate(over="ignore"):
                    rounded = host_maps.astype(np.float16)
                overflow = bool(np.isinf(rounded).any() and not np.isinf(host_maps).any())
            else:
                rounded = host_maps.to(torch.float16)
                overflow = bool(torch.isinf(rounded).any() and not torch.isinf(host_maps).any())
            if overflow:
                warnings.warn(
                    "anomaly map values exceed the float16 range (65504) and were stored as inf; "
                    "use map_dtype=torch.float32",
                    stacklevel=3,
                )
            host_maps = rounded
        return host_maps, host_masks

    @staticmethod
    def _spatial(x: Tensor, b: int, name: str) -> Tensor:
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.shape[0] != b:
            raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W) with B={b}, got {tuple(x.shape)}")
        return x

    def compute(self) -> dict[str, Any]:
        """Per-class table, class means and mAD over the de-duplicated test set.

        Returns:
            ``{"per_class": {class_name: {metric_name: float, "mAD": float}},
            "mean": {metric_name: float, "mAD": float}}`` with the metric names of :data:`METRIC_NAMES`.
            Classes without test samples are omitted; the mean is unweighted over the classes present. With
            ``pixel_metrics=False`` only the image metrics are reported and there is no ``mAD``. Undefined
            values are NaN (with a warning naming the class and metric).

        Raises:
            ValueError: If samples sharing a test index have different labels or classes, or ranks stored
                maps of different sizes.
        """
        scores = flat_numpy(self.image_scores).astype(np.float64)
        lab = flat_numpy(self.labels).astype(np.int64)
        cls = flat_numpy(self.class_ids).astype(np.int64)
        idx = flat_numpy(self.indices).astype(np.int64)
        order = dedup_order(idx, lab, cls)
        # Inside compute, torchmetrics has gathered the small states iff it runs distributed.
        gather = _ClassGather(self._store, self.process_group) if self.pixel_metrics and self._is_synced else None
        per_class: dict[str, dict[str, float]] = {}
        for c, name in enumerate(self.class_names):
            rows = order[cls[order] == c]
            if rows.size == 0:
                continue
            maps = masks = None
            if self.pixel_metrics:
                want = idx[rows]
                maps, masks = gather.class_rows(c, want) if gather is not None else self._local_rows(c, want)
            per_class[name] = class_row(name, scores[rows], lab[rows], maps, masks, self.fpr_limit)
            del maps, masks
        return {"per_class": per_class, "mean": table_means(per_class, pixel=self.pixel_metrics)}

    def _local_rows(self, c: int, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The de-duplicated maps and masks of class ``c`` of this process, in ascending index order."""
        stored = self._store.class_indices(c)
        unique, first = np.unique(stored, return_index=True)
        _check_rows(c, unique, want)
        spatial = self._store.spatial
        assert spatial is not None  # set by the first stored batch; a class with rows has one
        maps = np.empty((unique.size, *spatial), dtype=self._store.dtype)
        masks = np.empty((unique.size, *spatial), dtype=np.uint8)
        self._store.read(c, first, maps, masks)
        return maps, masks

    def reset(self) -> None:
        """Clear every state, free the stored maps and delete the spill files."""
        super().reset()
        self._store.close()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update`: per-batch values of these dataset-level metrics are meaningless."""
        self.update(*args, **kwargs)

    def _copy_state_dict(self) -> dict[str, Any]:
        # torchmetrics caches a *deep* copy of the states before a DDP sync to restore them afterwards.
        # Stored tensors are never modified in place here, so sharing them avoids one copy during compute.
        return {
            attr: list(val) if isinstance(val, list) else val.detach().clone()
            for attr, val in ((a, getattr(self, a)) for a in self._defaults)
        }
