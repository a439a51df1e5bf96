"""ROC and PRO curve points for plots, from the exact rank statistics of :mod:`mcad.metrics`.

The metric engine already computes, at every distinct positive score, how many positives and negatives
score at or above it (:class:`~mcad.metrics._ranking.RankStats`); the curves are those counts divided by the
totals, with the same tie handling as the metrics (a tie group enters as one diagonal step). Only the
number of drawn points is reduced (evenly spaced along the curve, ends kept): the metrics in the results
files never come from these points.
"""

from __future__ import annotations

import numpy as np

from mcad.metrics._ranking import rank_stats, region_weights


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[list[float], list[float]]:
    if x.size > max_points:
        keep = np.unique(np.linspace(0, x.size - 1, max_points).round().astype(np.int64))
        x, y = x[keep], y[keep]
    return x.tolist(), y.tolist()


def _steps(fp_strict: np.ndarray, fp: np.ndarray, before: np.ndarray, after: np.ndarray, n_neg: int):
    """Interleaves each tie group's start ``(FPR(>u), y before)`` and end ``(FPR(>=u), y after)``."""
    x = np.empty(2 * fp.size + 2)
    y = np.empty_like(x)
    x[0], y[0] = 0.0, 0.0
    x[1:-1:2], y[1:-1:2] = fp_strict / n_neg, before
    x[2:-1:2], y[2:-1:2] = fp / n_neg, after
    x[-1], y[-1] = 1.0, 1.0
    return x, y


def roc_curve_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> tuple[list, list] | None:
    """``(fpr, tpr)`` of the ROC curve of any scores, or ``None`` if one class is absent."""
    scores = np.ascontiguousarray(np.asarray(scores, dtype=np.float64).reshape(-1))
    labels = np.asarray(labels).reshape(-1) != 0
    stats = rank_stats(scores, np.flatnonzero(labels))
    if stats.n_pos == 0 or stats.n_neg == 0:
        return None
    tpr = stats.tp / stats.n_pos
    x, y = _steps(stats.fp_strict, stats.fp, np.concatenate(([0.0], tpr[:-1])), tpr, stats.n_neg)
    return _thin(x, y, max_points)


def pro_curve_points(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3,
                     max_points: int = 200) -> tuple[list, list] | None:  # fmt: skip
    """``(fpr, pro)`` of the per-region-overlap curve up to ``fpr_limit``, or ``None`` without regions.

    Args:
        maps: ``(N, H, W)`` evaluated maps.
        masks: ``(N, H, W)`` binary ground truth.
        fpr_limit: Last drawn FPR (the AUPRO integration limit).
        max_points: Points kept for drawing.
    """
    maps = np.ascontiguousarray(np.asarray(maps, dtype=np.float32))
    masks = np.ascontiguousarray((np.asarray(masks) != 0).astype(np.uint8))
    weights, n_regions = region_weights(masks)
    stats = rank_stats(maps.reshape(-1), np.flatnonzero(masks.reshape(-1)), weights)
    if n_regions == 0 or stats.n_neg == 0 or stats.weights is None:
        return None
    cum = np.cumsum(stats.weights) / n_regions
    x, y = _steps(stats.fp_strict, stats.fp, np.concatenate(([0.0], cum[:-1])), cum, stats.n_neg)
    inside = x <= fpr_limit
    return _thin(x[inside], y[inside], max_points)
