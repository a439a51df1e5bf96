"""Per-class metric table from per-sample arrays (private; re-exported by :mod:`mcad.metrics`).

Kept free of torchmetrics so that offline evaluation and the benchmark do not pay its import; the
torchmetrics accumulator (:mod:`mcad.evaluation.accumulator`) calls :func:`compute_metrics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, overload

import numpy as np
import torch
from numpy.typing import DTypeLike
from torch import Tensor

from mcad.metrics.functional import binary_metrics, pixel_metrics

__all__ = [
    "IMAGE_METRICS",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "class_row",
    "compute_metrics",
    "dedup_order",
    "flat_numpy",
    "table_means",
]

METRIC_NAMES = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO")  # mAD = mean of these 7
IMAGE_METRICS = METRIC_NAMES[:3]
PIXEL_METRICS = METRIC_NAMES[3:]

Chunks = Tensor | np.ndarray | Sequence[Tensor] | Sequence[np.ndarray]


@overload
def flat_numpy(x: Chunks) -> np.ndarray: ...


@overload
def flat_numpy(x: None) -> None: ...


def flat_numpy(x: Chunks | None) -> np.ndarray | None:
    """Concatenate small per-sample states (scores, labels, ids) into one 1-D NumPy array."""
    if x is None:
        return None
    chunks: Sequence[Tensor | np.ndarray] = [x] if isinstance(x, (Tensor, np.ndarray)) else x
    parts = [p.detach().cpu().numpy() if isinstance(p, Tensor) else np.asarray(p) for p in chunks]
    if not parts:
        return np.zeros(0)
    return np.concatenate([p.reshape(-1) for p in parts])


class _Rows:
    """Row access over a list of ``(B_i, H, W)`` chunks without concatenating them (saves a full copy)."""

    def __init__(self, chunks: Chunks) -> None:
        parts: Sequence[Tensor | np.ndarray] = [chunks] if isinstance(chunks, (Tensor, np.ndarray)) else chunks
        tensors = [c if isinstance(c, Tensor) else torch.from_numpy(np.asarray(c)) for c in parts]
        # Empty placeholders (torchmetrics sends a 1-D empty tensor for a rank without data) carry no rows.
        self.chunks = [c for c in tensors if c.numel() > 0]
        sizes = [int(c.shape[0]) for c in self.chunks]
        self.offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self.n = int(self.offsets[-1])
        self.spatial = tuple(self.chunks[0].shape[1:]) if self.chunks else ()
        for c in self.chunks:
            if tuple(c.shape[1:]) != self.spatial:
                raise ValueError(
                    f"all maps/masks must share one spatial size; got {tuple(c.shape[1:])} and {self.spatial}"
                )

    def take(self, rows: np.ndarray, dtype: DTypeLike) -> np.ndarray:
        """Rows ``rows`` (global positions, any order) as one contiguous CPU array of ``dtype``."""
        out = np.empty((rows.size, *self.spatial), dtype=dtype)
        chunk_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for c in np.unique(chunk_of):
            sel = np.flatnonzero(chunk_of == c)
            local = rows[sel] - self.offsets[c]
            src = self.chunks[c].detach()
            if src.device.type != "cpu":
                # Index on the source device, then move only the selected rows.
                src = src[torch.from_numpy(local).to(src.device)].cpu()
                local = np.arange(local.size)
            # Slices for runs of consecutive rows (the common case) copy much faster than a gather.
            out[_as_slice(sel)] = src.numpy()[_as_slice(local)]
        return out


def _as_slice(a: np.ndarray) -> slice | np.ndarray:
    if a.size and int(a[-1]) - int(a[0]) + 1 == a.size and bool((np.diff(a) == 1).all()):
        return slice(int(a[0]), int(a[-1]) + 1)
    return a


def dedup_order(indices: np.ndarray, labels: np.ndarray, class_ids: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of every test index, in ascending index order."""
    _, first = np.unique(indices, return_index=True)
    if first.size != indices.size:
        # Duplicates must be the same sample (DistributedSampler padding), not two samples sharing an index.
        inverse = np.searchsorted(indices[first], indices)
        canonical = first[inverse]
        if (labels != labels[canonical]).any() or (class_ids != class_ids[canonical]).any():
            raise ValueError(
                "samples sharing a test index have different labels/classes; "
                "`indices` must identify the sample's position in the test set"
            )
    return first


def compute_metrics(
    image_scores: Chunks,
    labels: Chunks,
    class_ids: Chunks,
    class_names: Sequence[str],
    anomaly_maps: Chunks | None = None,
    gt_masks: Chunks | None = None,
    indices: Chunks | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, Any]:
    """Per-class metric table from per-sample arrays (no torchmetrics involved).

    Every argument that holds per-sample data may be a tensor/array or a list of per-batch chunks (maps
    and masks are then never concatenated as a whole; only one class at a time is materialised).

    Args:
        image_scores: ``(N,)`` image scores, any real values.
        labels: ``(N,)`` image labels, 0 normal / 1 anomalous.
        class_ids: ``(N,)`` index into ``class_names``.
        class_names: Category names.
        anomaly_maps: ``(N, H, W)`` post-processed maps, or None for image metrics only.
        gt_masks: ``(N, H, W)`` binarised masks ({0, 1} or bool); required with ``anomaly_maps``.
        indices: ``(N,)`` test-set positions. If given, duplicated indices are dropped (first occurrence
            kept) and samples are ordered by index; if None, every row is a distinct sample.
        fpr_limit: AUPRO integration limit.

    Returns:
        ``{"per_class": {name: {metric: float, ..., "mAD": float}}, "mean": {metric: float, "mAD": float}}``.
        Classes without samples are omitted; ``mean`` is the unweighted mean over the classes present (a
        NaN in one class propagates to the mean). Without maps only the image metrics are reported and
        there is no ``mAD`` (it is defined as the mean of all seven metrics). Undefined metrics (e.g. a
        class without anomalous samples) are NaN with an :class:`~mcad.metrics.UndefinedMetricWarning`
        that names the class.
    """
    if (anomaly_maps is None) != (gt_masks is None):
        raise ValueError("anomaly_maps and gt_masks must be given together")
    scores = flat_numpy(image_scores).astype(np.float64)
    lab = flat_numpy(labels).astype(np.int64)
    cls = flat_numpy(class_ids).astype(np.int64)
    n = scores.size
    if lab.size != n or cls.size != n:
        raise ValueError(f"image_scores ({n}), labels ({lab.size}) and class_ids ({cls.size}) differ in length")
    if n and (cls.min() < 0 or cls.max() >= len(class_names)):
        raise ValueError(f"class_ids must be in [0, {len(class_names)})")
    if indices is not None:
        idx = flat_numpy(indices).astype(np.int64)
        if idx.size != n:
            raise ValueError(f"indices ({idx.size}) and image_scores ({n}) differ in length")
        order = dedup_order(idx, lab, cls)
    else:
        order = np.arange(n)

    maps = masks = None
    if anomaly_maps is not None:
        assert gt_masks is not None  # given together with anomaly_maps (checked above)
        maps, masks = _Rows(anomaly_maps), _Rows(gt_masks)
        if maps.n != n or masks.n != n:
            raise ValueError(f"{maps.n} maps / {masks.n} masks for {n} image scores")
        if any(c.is_floating_point() for c in masks.chunks):
            raise ValueError("gt_masks must be bool or integer {0, 1}; binarise with the protocol's gt_threshold")
        if maps.spatial != masks.spatial:
            raise ValueError(f"maps {maps.spatial} and masks {masks.spatial} differ in spatial size")

    per_class: dict[str, dict[str, float]] = {}
    # Only used with maps; float64 maps stay float64, anything else is materialised as float32.
    map_dtype = np.float64 if maps is not None and maps.chunks[0].dtype == torch.float64 else np.float32
    for c, name in enumerate(class_names):
        rows = order[cls[order] == c]
        if rows.size == 0:
            continue
        # Only one class's maps are materialised at a time (float32 copy, uint8 masks).
        m = None if maps is None else maps.take(rows, map_dtype)
        g = None if masks is None else masks.take(rows, np.uint8)
        per_class[name] = class_row(name, scores[rows], lab[rows], m, g, fpr_limit)
        del m, g
    return {"per_class": per_class, "mean": table_means(per_class, pixel=maps is not None)}


def class_row(
    name: str,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | None,
    fpr_limit: float,
) -> dict[str, float]:
    """The metric row of one class (image metrics, and pixel metrics + mAD when maps are given).

    Shared by :func:`compute_metrics` and the accumulator, which materialises the class's maps from its own
    (possibly disk-backed, possibly distributed) storage.

    Args:
        name: Class name, prefixed to the messages of undefined-metric warnings.
        scores: ``(n,)`` image scores of the class's samples, in test-index order.
        labels: ``(n,)`` image labels {0, 1}, aligned with ``scores``.
        maps: ``(n, H, W)`` maps aligned with ``scores``, or None for image metrics only.
        masks: ``(n, H, W)`` uint8 {0, 1} masks; required with ``maps``.
        fpr_limit: AUPRO integration limit.

    Returns:
        ``{metric: float}`` with the image metrics and, with maps, the pixel metrics and ``mAD``.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = binary_metrics(scores, labels, prefix="I-")
        if maps is not None:
            if masks is None:
                raise ValueError(f"class {name!r}: masks are required with maps")
            row.update(pixel_metrics(maps, masks, fpr_limit=fpr_limit, prefix="P-"))
            row["mAD"] = float(np.mean([row[k] for k in METRIC_NAMES]))
    for w in caught:
        warnings.warn(f"class {name!r}: {w.message}", w.category, stacklevel=3)
    return row


def table_means(per_class: dict[str, dict[str, float]], pixel: bool) -> dict[str, float]:
    """Unweighted class means of every metric (and their mean, ``mAD``, when ``pixel``); {} without classes."""
    names = METRIC_NAMES if pixel else IMAGE_METRICS
    mean: dict[str, float] = {}
    if per_class:
        for k in names:
            mean[k] = float(np.mean([row[k] for row in per_class.values()]))
        if pixel:
            mean["mAD"] = float(np.mean([mean[k] for k in METRIC_NAMES]))
    return mean
