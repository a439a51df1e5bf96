"""Exact anomaly-detection metrics on plain tensors/arrays.

All functions are exact (every distinct score is a threshold; tied scores enter together, as in sklearn)
and never transform scores: any real-valued scores work (no sigmoid, no normalisation). They accept torch
tensors (any device) or NumPy arrays and return a Python ``float``.

Degenerate inputs: a metric that is undefined for the input returns ``float('nan')`` and emits an
:class:`UndefinedMetricWarning` naming the metric:

* AUROC needs at least one positive and one negative;
* AP and F1max need at least one positive (with only positives they are 1.0);
* AUPRO needs at least one ground-truth region and at least one normal pixel.

Constant scores are valid: AUROC 0.5, AP = prevalence, F1max = 2p/(1+p), like sklearn.
NaN scores raise ``ValueError``; ``inf`` is allowed (it is just the largest/smallest score).

Curves for plots: :func:`roc_points` and :func:`pro_points` return vertices of the very curves these
metrics integrate (same statistics, same tie handling), optionally thinned for drawing.

Cost: one value-only ``np.sort`` of the scores (vectorised in NumPy >= 2) plus work proportional to the
number of positives; see :mod:`mcad.metrics._ranking` for the derivation.
"""

from __future__ import annotations

import numpy as np
import torch

from mcad.metrics._ranking import (
    RankStats,
    UndefinedMetricWarning,
    auroc_from_stats,
    average_precision_from_stats,
    f1_max_from_stats,
    pro_auc_from_stats,
    rank_stats,
    region_weights,
)

__all__ = [
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "f1_max",
    "pixel_metrics",
    "pro_points",
    "roc_points",
    "thin_curve",
]

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            # Upcasting is exact and order-preserving; NumPy has no bfloat16 and sorts float16 slowly.
            x = x.to(torch.float32)
        return x.cpu().numpy()
    return np.asarray(x)


def _as_scores(x: ArrayLike, name: str = "scores") -> np.ndarray:
    """Contiguous float32/float64 array of the same shape; other dtypes are converted exactly."""
    a = _to_numpy(x)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif a.dtype not in (np.float32, np.float64):
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            raise TypeError(f"{name} must be numeric, got dtype {a.dtype}")
        a = a.astype(np.float64)
    return np.ascontiguousarray(a)


def _as_binary(y: ArrayLike, name: str) -> np.ndarray:
    """Contiguous uint8 {0, 1} array; raises if values other than 0/1 are present."""
    a = _to_numpy(y)
    if a.dtype == np.bool_:
        return np.ascontiguousarray(a).view(np.uint8)
    if a.dtype == np.uint8:
        if a.size and a.max() > 1:
            raise ValueError(f"{name} must be binary (0/1); found values up to {a.max()}")
        return np.ascontiguousarray(a)
    if a.size and not np.isin(a, (0, 1)).all():
        raise ValueError(f"{name} must be binary (0/1); binarise masks/labels before computing metrics")
    return np.ascontiguousarray(a.astype(np.uint8))


def _positions(binary: np.ndarray) -> np.ndarray:
    """Flat positions of the ones of a {0, 1} uint8 array (via a bool view: ~7x faster than on uint8)."""
    return np.flatnonzero(binary.reshape(-1).view(np.bool_))


def _binary_stats(scores: ArrayLike, labels: ArrayLike) -> RankStats:
    s = _as_scores(scores).reshape(-1)
    y = _as_binary(labels, "labels").reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and labels must have the same number of elements, got {s.size} and {y.size}")
    return rank_stats(s, _positions(y))


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Exact area under the ROC curve (sklearn ``roc_auc_score`` semantics, ties count 1/2).

    Args:
        scores: Scores of any shape (flattened), any real values; higher = more anomalous.
        labels: Binary labels (bool or {0, 1}) with the same number of elements.

    Returns:
        AUROC in [0, 1], or NaN (with :class:`UndefinedMetricWarning`) if only one class is present.
    """
    return auroc_from_stats(_binary_stats(scores, labels))


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Step-wise average precision, exactly as sklearn's ``average_precision_score`` (not trapezoidal).

    Args:
        scores: Scores of any shape (flattened), any real values; higher = more anomalous.
        labels: Binary labels (bool or {0, 1}) with the same number of elements.

    Returns:
        AP in [0, 1], or NaN (with :class:`UndefinedMetricWarning`) if there is no positive.
    """
    return average_precision_from_stats(_binary_stats(scores, labels))


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Maximum over all thresholds of F1 = 2PR/(P+R) (thresholds as sklearn's ``precision_recall_curve``).

    Args:
        scores: Scores of any shape (flattened), any real values; higher = more anomalous.
        labels: Binary labels (bool or {0, 1}) with the same number of elements.

    Returns:
        F1max in [0, 1], or NaN (with :class:`UndefinedMetricWarning`) if there is no positive.
    """
    return f1_max_from_stats(_binary_stats(scores, labels))


def binary_metrics(scores: ArrayLike, labels: ArrayLike, prefix: str = "") -> dict[str, float]:
    """AUROC, AP and F1max from one shared pass (see :func:`auroc`, :func:`average_precision`, :func:`f1_max`).

    Args:
        scores: Scores of any shape (flattened), any real values.
        labels: Binary labels with the same number of elements.
        prefix: Prepended to the keys and to warning messages, e.g. ``"I-"``.

    Returns:
        ``{prefix+"AUROC": ..., prefix+"AP": ..., prefix+"F1max": ...}``.
    """
    stats = _binary_stats(scores, labels)
    return {
        f"{prefix}AUROC": auroc_from_stats(stats, f"{prefix}AUROC"),
        f"{prefix}AP": average_precision_from_stats(stats, f"{prefix}AP"),
        f"{prefix}F1max": f1_max_from_stats(stats, f"{prefix}F1max"),
    }


def _pixel_inputs(anomaly_maps: ArrayLike, gt_masks: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    maps = _as_scores(anomaly_maps, "anomaly_maps")
    masks = _as_binary(gt_masks, "gt_masks")
    if maps.shape != masks.shape:
        raise ValueError(f"anomaly_maps {maps.shape} and gt_masks {masks.shape} must have the same shape")
    if maps.ndim < 2:
        raise ValueError(f"anomaly_maps must be (..., H, W), got shape {maps.shape}")
    h, w = maps.shape[-2:]
    return maps.reshape(-1, h, w), masks.reshape(-1, h, w)


def pixel_metrics(
    anomaly_maps: ArrayLike,
    gt_masks: ArrayLike,
    fpr_limit: float = 0.3,
    with_aupro: bool = True,
    prefix: str = "",
) -> dict[str, float]:
    """Pixel AUROC, AP, F1max and AUPRO of a set of maps from one shared sort.

    Args:
        anomaly_maps: ``(N, H, W)`` (or ``(..., H, W)``) float maps, any real values.
        gt_masks: Binary masks of the same shape (bool or {0, 1}).
        fpr_limit: FPR integration limit of AUPRO.
        with_aupro: Skip the connected-component labelling and AUPRO when False.
        prefix: Prepended to the keys and to warning messages, e.g. ``"P-"``.

    Returns:
        ``{prefix+"AUROC", prefix+"AP", prefix+"F1max"[, "AUPRO"]}``; the AUPRO key is never prefixed.
    """
    maps, masks = _pixel_inputs(anomaly_maps, gt_masks)
    weights, n_regions = region_weights(masks) if with_aupro else (None, 0)
    stats = rank_stats(maps.reshape(-1), _positions(masks), weights)
    out = {
        f"{prefix}AUROC": auroc_from_stats(stats, f"{prefix}AUROC"),
        f"{prefix}AP": average_precision_from_stats(stats, f"{prefix}AP"),
        f"{prefix}F1max": f1_max_from_stats(stats, f"{prefix}F1max"),
    }
    if with_aupro:
        out["AUPRO"] = pro_auc_from_stats(stats, n_regions, fpr_limit)
    return out


def aupro(anomaly_maps: ArrayLike, gt_masks: ArrayLike, fpr_limit: float = 0.3) -> float:
    """Exact normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD definition).

    Regions are the 8-connected components of each 2-D mask; R is their number over all maps. For a
    threshold t, PRO(t) = (1/R) sum_r |{p in r: s_p >= t}| / A_r and FPR(t) = |{normal p: s_p >= t}| / N.
    Every distinct score is a threshold (ties enter together); the curve starts at (0, 0) and is integrated
    with the trapezoid rule up to FPR = ``fpr_limit`` (interpolating linearly at the limit), then divided
    by ``fpr_limit``.

    Args:
        anomaly_maps: ``(N, H, W)`` (or ``(..., H, W)``) float maps, any real values.
        gt_masks: Binary masks of the same shape (bool or {0, 1}).
        fpr_limit: Upper FPR integration limit in (0, 1].

    Returns:
        AUPRO in [0, 1], or NaN (with :class:`UndefinedMetricWarning`) if there is no region or no normal
        pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, masks = _pixel_inputs(anomaly_maps, gt_masks)
    weights, n_regions = region_weights(masks)
    stats = rank_stats(maps.reshape(-1), _positions(masks), weights)
    return pro_auc_from_stats(stats, n_regions, fpr_limit)


# ----------------------------------------------------------------------------------------- curve points
def _vertices(fp_strict: np.ndarray, fp: np.ndarray, before: np.ndarray, after: np.ndarray, n_neg: int,
              end: float) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The polyline the metrics integrate: each tie group from ``(FPR(>u), y before)`` to ``(FPR(>=u), y after)``.

    Consecutive groups are joined by horizontal stretches (negatives between two positive scores), the
    curve starts at (0, 0) and ends at ``(1, end)``.
    """
    x = np.empty(2 * fp.size + 2)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], y[1:-1:2] = fp_strict / n_neg, before
    x[2:-1:2], y[2:-1:2] = fp / n_neg, after
    x[-1], y[-1] = 1.0, end
    return x, y


def thin_curve(x: ArrayLike, y: ArrayLike, max_points: int | None) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of a polyline's vertices, evenly spaced along its length, both ends kept.

    Spacing by arc length rather than by index keeps the bend of a curve (where the vertices are dense in
    index but short in length) as visible as its long straight stretches. Kept points are vertices of the
    exact curve; none is moved.

    Args:
        x: ``(n,)`` x coordinates of the vertices, in drawing order.
        y: ``(n,)`` y coordinates.
        max_points: Most vertices kept (at least 2); ``None`` keeps all.

    Returns:
        The kept vertices' x and y as float64 arrays.
    """
    x = np.asarray(_to_numpy(x), dtype=np.float64).reshape(-1)
    y = np.asarray(_to_numpy(y), dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    if max_points is None or x.size <= max_points:
        return x, y
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2 (or None), got {max_points}")
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))
    keep = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    keep = np.unique(np.clip(keep, 0, x.size - 1))
    keep[0], keep[-1] = 0, x.size - 1  # searchsorted may land on a duplicate of the first/last vertex
    keep = np.unique(keep)
    return x[keep], y[keep]


def roc_points(
    scores: ArrayLike, labels: ArrayLike, max_points: int | None = 200
) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices ``(fpr, tpr)`` of the exact ROC curve of any scores (image scores, or maps and masks).

    The curve is the one :func:`auroc` integrates: every distinct score is a threshold, a group of tied
    scores is one diagonal segment, and the trapezoidal area under all vertices equals :func:`auroc`.

    Args:
        scores: Scores of any shape (flattened), any real values; higher = more anomalous.
        labels: Binary labels (bool or {0, 1}) with the same number of elements.
        max_points: Vertices kept for drawing (evenly spaced along the curve); ``None`` keeps every vertex.

    Returns:
        Two float64 arrays from (0, 0) to (1, 1), FPR non-decreasing, or ``None`` when one class is absent.
    """
    stats = _binary_stats(scores, labels)
    if stats.n_pos == 0 or stats.n_neg == 0:
        return None
    tpr = stats.tp / stats.n_pos
    x, y = _vertices(stats.fp_strict, stats.fp, np.concatenate(([0.0], tpr[:-1])), tpr, stats.n_neg, 1.0)
    return thin_curve(x, y, max_points)


def pro_points(
    anomaly_maps: ArrayLike, gt_masks: ArrayLike, fpr_limit: float = 0.3, max_points: int | None = 200
) -> tuple[np.ndarray, np.ndarray] | None:
    """Vertices ``(fpr, pro)`` of the exact per-region-overlap curve up to ``fpr_limit``.

    The curve is the one :func:`aupro` integrates, cut at ``fpr_limit`` with the linearly interpolated point
    at the limit, so the trapezoidal area under all vertices divided by ``fpr_limit`` equals :func:`aupro`.

    Args:
        anomaly_maps: ``(N, H, W)`` (or ``(..., H, W)``) float maps, any real values.
        gt_masks: Binary masks of the same shape (bool or {0, 1}).
        fpr_limit: Last FPR of the curve, in (0, 1].
        max_points: Vertices kept for drawing; ``None`` keeps every vertex.

    Returns:
        Two float64 arrays starting at (0, 0) and ending at FPR = ``fpr_limit``, or ``None`` without a
        ground-truth region or without a normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps, masks = _pixel_inputs(anomaly_maps, gt_masks)
    weights, n_regions = region_weights(masks)
    stats = rank_stats(maps.reshape(-1), _positions(masks), weights)
    if n_regions == 0 or stats.n_pos == 0 or stats.n_neg == 0 or stats.weights is None:
        return None
    cum = np.cumsum(stats.weights) / n_regions
    x, y = _vertices(stats.fp_strict, stats.fp, np.concatenate(([0.0], cum[:-1])), cum, stats.n_neg, cum[-1])
    # Cut at the limit: the first vertex beyond it is replaced by the interpolated point on its segment.
    beyond = int(np.searchsorted(x, fpr_limit, side="right"))
    if beyond < x.size and x[beyond - 1] < fpr_limit:
        frac = (fpr_limit - x[beyond - 1]) / (x[beyond] - x[beyond - 1])
        x = np.append(x[:beyond], fpr_limit)
        y = np.append(y[:beyond], y[beyond - 1] + frac * (y[beyond] - y[beyond - 1]))
    else:
        x, y = x[:beyond], y[:beyond]
    return thin_curve(x, y, max_points)
