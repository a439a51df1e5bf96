"""Exact rank statistics shared by every curve metric (private engine of :mod:`mcad.metrics.functional`).

Why this design
---------------
All seven metrics only need, for every *distinct positive score* ``u`` (descending), how many positives
and how many negatives score ``>= u`` and ``> u``. Negatives that fall strictly between two consecutive
positive scores never move TP, so:

* AUROC (Mann-Whitney form) only needs, per positive, the negatives below / tied with it;
* step-wise AP and F1max only change at thresholds where TP changes, i.e. at positive scores;
* the PRO curve is constant between positive scores, so the trapezoids over those stretches are
  rectangles whose area only depends on how many negatives they contain.

Hence one *value-only* sort of all scores (``np.sort``; no argsort and no label permutation over the big
array) plus an argsort of the few positives and a ``searchsorted`` of the distinct positive values gives
every curve point exactly. NumPy >= 2 sorts float32/float64 with vectorised (AVX2/AVX-512 or Highway)
quicksort, which is ~25x faster than ``torch.sort`` on CPU (25 ms vs 690 ms for 7.5 M floats on the
development machine); ``torch.sort``/``argsort`` over all pixels is what makes a naive exact evaluator slow.
There is no binning, so there is no approximation error: results are exact up to float64 rounding
(~1e-12).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "RankStats",
    "UndefinedMetricWarning",
    "auroc_from_stats",
    "average_precision_from_stats",
    "f1_max_from_stats",
    "pro_auc_from_stats",
    "rank_stats",
    "region_weights",
]


class UndefinedMetricWarning(UserWarning):
    """Warning emitted when a metric is undefined for the given input (the metric returns NaN)."""


@dataclass(frozen=True)
class RankStats:
    """Curve statistics at every distinct positive score, in descending score order.

    Attributes:
        n_pos: Number of positive samples/pixels ``P``.
        n_neg: Number of negative samples/pixels ``N``.
        counts: ``(k,)`` int64, positives with score exactly ``u_j``.
        tp: ``(k,)`` int64, positives with score ``>= u_j`` (cumulative ``counts``).
        fp: ``(k,)`` int64, negatives with score ``>= u_j``.
        fp_strict: ``(k,)`` int64, negatives with score ``> u_j``.
        weights: ``(k,)`` float64 sum of the per-positive weights at ``u_j`` (AUPRO's ``1/A_r``), or None.
    """

    n_pos: int
    n_neg: int
    counts: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fp_strict: np.ndarray
    weights: np.ndarray | None = None


def rank_stats(scores: np.ndarray, pos_index: np.ndarray, pos_weights: np.ndarray | None = None) -> RankStats:
    """Compute exact :class:`RankStats` with one value-only sort.

    Args:
        scores: 1-D float32/float64 array of all scores (positives and negatives).
        pos_index: 1-D int array, ascending positions of the positives in ``scores``.
        pos_weights: Optional 1-D float64 array aligned with ``pos_index`` (per-positive weight).

    Returns:
        The statistics at every distinct positive score.

    Raises:
        ValueError: If ``scores`` contains NaN.
    """
    n = int(scores.size)
    n_pos = int(pos_index.size)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return RankStats(0, 0, empty, empty, empty, empty, None if pos_weights is None else np.zeros(0))
    # Value-only sort (vectorised in NumPy); NaN sorts last, so this also validates the input for free.
    sorted_all = np.sort(scores)
    if np.isnan(sorted_all[-1]):
        raise ValueError("scores contain NaN; metrics are undefined for NaN scores")
    pos_scores = scores[pos_index]
    # Descending order of the (few) positives. The (vectorised, unstable) sort is deterministic for a given
    # input, so weight sums within tie groups are reproducible bit-for-bit.
    order = np.argsort(-pos_scores)
    pos_scores = pos_scores[order]
    if n_pos:
        # `!=` treats -0.0 and +0.0 as equal, like sklearn's np.diff-based tie detection.
        starts = np.flatnonzero(np.concatenate(([True], pos_scores[1:] != pos_scores[:-1])))
    else:
        starts = np.zeros(0, dtype=np.int64)
    distinct = pos_scores[starts]
    counts = np.diff(np.append(starts, n_pos)).astype(np.int64)
    tp = np.cumsum(counts)
    # Elements below u_j, and elements <= u_j. The latter is left + counts_j unless negatives tie with u_j,
    # which is rare for continuous maps: a second binary search only for those (saves one full search).
    left = np.searchsorted(sorted_all, distinct, side="left")
    right = left + counts
    inside = right < n
    tied = np.zeros(distinct.size, dtype=bool)
    tied[inside] = sorted_all[right[inside]] == distinct[inside]
    if tied.any():
        right[tied] = np.searchsorted(sorted_all, distinct[tied], side="right")
    del sorted_all
    n_ge = n - left
    n_gt = n - right
    fp = (n_ge - tp).astype(np.int64)
    fp_strict = (n_gt - (tp - counts)).astype(np.int64)
    weights = None
    if pos_weights is not None:
        weights = np.add.reduceat(pos_weights[order], starts) if n_pos else np.zeros(0)
    return RankStats(n_pos, n - n_pos, counts, tp, fp, fp_strict, weights)


def _undefined(metric: str, reason: str) -> float:
    warnings.warn(f"{metric} is undefined {reason}; returning NaN", UndefinedMetricWarning, stacklevel=3)
    return float("nan")


def auroc_from_stats(stats: RankStats, name: str = "AUROC") -> float:
    """Exact AUROC (ties count 1/2, as sklearn's ``roc_auc_score``); NaN if one class is absent."""
    if stats.n_pos == 0:
        return _undefined(name, "without positive (anomalous) samples")
    if stats.n_neg == 0:
        return _undefined(name, "without negative (normal) samples")
    n_neg = stats.n_neg
    # Per positive at u_j: negatives strictly below + 1/2 negatives tied = (2N - fp - fp_strict) / 2.
    # Integer numerator: exact, and independent of summation order.
    numerator = int(np.dot(stats.counts, 2 * n_neg - stats.fp - stats.fp_strict))
    return float(numerator / (2 * stats.n_pos * n_neg))


def average_precision_from_stats(stats: RankStats, name: str = "AP") -> float:
    """Step-wise average precision, as sklearn's ``average_precision_score``; NaN without positives."""
    if stats.n_pos == 0:
        return _undefined(name, "without positive (anomalous) samples")
    precision = stats.tp / (stats.tp + stats.fp)
    return float(min(1.0, np.dot(stats.counts, precision) / stats.n_pos))


def f1_max_from_stats(stats: RankStats, name: str = "F1max") -> float:
    """Max over all thresholds of F1 = 2PR/(P+R) = 2TP/(TP+FP+P); NaN without positives.

    F1 can only increase where TP increases, i.e. at a positive score, so only those points are checked.
    """
    if stats.n_pos == 0:
        return _undefined(name, "without positive (anomalous) samples")
    f1 = 2.0 * stats.tp / (stats.tp + stats.fp + stats.n_pos)
    return float(min(1.0, f1.max()))


def _clipped_trapezoids(x0: np.ndarray, x1: np.ndarray, y0: np.ndarray, y1: np.ndarray, limit: float) -> float:
    """Area under the polyline of segments (x0,y0)-(x1,y1) restricted to x <= limit (x0 <= x1)."""
    keep = x0 < limit
    x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    x_end = np.minimum(x1, limit)
    width = x1 - x0
    # Linear interpolation of y at the limit for the one segment that crosses it.
    frac = np.divide(x_end - x0, width, out=np.ones_like(width), where=width > 0)
    y_end = y0 + (y1 - y0) * frac
    return float(np.sum((x_end - x0) * (y0 + y_end)) * 0.5)


def pro_auc_from_stats(stats: RankStats, n_regions: int, fpr_limit: float = 0.3, name: str = "AUPRO") -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (exact MVTec AD definition).

    The curve starts at (0, 0); each distinct positive score contributes the segment from
    (FPR(>u), PRO(>u)) to (FPR(>=u), PRO(>=u)) (ties enter together), and the negatives strictly between
    two positive scores form a horizontal stretch. The last stretch ends at (1, 1).
    """
    if n_regions == 0 or stats.n_pos == 0:
        return _undefined(name, "without anomalous regions in the ground truth")
    if stats.n_neg == 0:
        return _undefined(name, "without normal pixels")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if stats.weights is None:
        raise ValueError("pro_auc_from_stats needs RankStats computed with region weights")
    n_neg = float(stats.n_neg)
    cum = np.concatenate(([0.0], np.cumsum(stats.weights))) / n_regions
    pro_before, pro_after = cum[:-1], cum[1:]
    fpr_before = stats.fp_strict / n_neg
    fpr_after = stats.fp / n_neg
    # Horizontal stretches: from the previous group's end (or the origin) to this group's start, plus the
    # final stretch from the last group to FPR = 1.
    stretch_x0 = np.concatenate(([0.0], fpr_after))
    stretch_x1 = np.concatenate((fpr_before, [1.0]))
    stretch_y = cum
    area = _clipped_trapezoids(fpr_before, fpr_after, pro_before, pro_after, fpr_limit)
    area += _clipped_trapezoids(stretch_x0, stretch_x1, stretch_y, stretch_y, fpr_limit)
    return float(min(1.0, max(0.0, area / fpr_limit)))


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-positive-pixel weight ``1/A_r`` of its 8-connected ground-truth region, and the region count R.

    Args:
        masks: ``(n, H, W)`` uint8 array with values in {0, 1}, C-contiguous.

    Returns:
        ``(weights, n_regions)`` where ``weights`` is float64, aligned with ``np.flatnonzero(masks)``
        (image-major, then row-major order).
    """
    n_img = masks.shape[0]
    flat = masks.reshape(n_img, -1)
    per_image = np.count_nonzero(flat, axis=1)
    out = np.empty(int(per_image.sum()), dtype=np.float64)
    pos = 0
    n_regions = 0
    for i in np.flatnonzero(per_image):
        mask = masks[i]
        # Regions are labelled per 2-D map: components never connect across images.
        n_labels, labels = cv2.connectedComponents(mask, connectivity=8, ltype=cv2.CV_32S)
        ids = labels[mask != 0]  # boolean indexing keeps row-major order, aligned with flatnonzero
        area = np.bincount(ids, minlength=n_labels)
        out[pos : pos + ids.size] = 1.0 / area[ids]
        pos += ids.size
        n_regions += n_labels - 1
    return out, n_regions
