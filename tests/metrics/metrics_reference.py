"""Independent, deliberately plain reference implementations for the metric tests and the benchmark.

Nothing here imports mcad. AUROC/AP/F1max come from sklearn; AUPRO is written straight from the
definition in docs/evaluation.md: regions from scipy.ndimage.label (8-connected, per 2-D map),
one descending sort of all pixels, cumulative sums with weights 1/(R*A_r) (region pixels) and 1/N
(normal pixels), one curve point per distinct score, trapezoid up to the FPR limit with linear
interpolation at the limit.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

EIGHT = np.ones((3, 3), dtype=int)
FOUR = ndimage.generate_binary_structure(2, 1)


def sk_f1max(scores, labels) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def sk_metrics(scores, labels) -> dict[str, float]:
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel().astype(int)
    return {
        "AUROC": float(roc_auc_score(labels, scores)),
        "AP": float(average_precision_score(labels, scores)),
        "F1max": sk_f1max(scores, labels),
    }


def label_regions(masks, structure=EIGHT):
    """Global region ids (0 = background) over a stack of 2-D masks; regions never cross maps."""
    masks = np.asarray(masks).astype(bool)
    ids = np.zeros(masks.shape, dtype=np.int64)
    n_regions = 0
    for i in range(masks.shape[0]):
        lab, k = ndimage.label(masks[i], structure=structure)
        ids[i][lab > 0] = lab[lab > 0] + n_regions
        n_regions += k
    return ids, n_regions


def _integrate(fpr, pro, fpr_limit):
    x = np.concatenate(([0.0], fpr))
    y = np.concatenate(([0.0], pro))
    k = int(np.searchsorted(x, fpr_limit, side="right"))  # x[:k] <= limit (x is non-decreasing)
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < fpr_limit:
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (fpr_limit - x[k - 1]) / (x[k] - x[k - 1])
        xs, ys = np.append(xs, fpr_limit), np.append(ys, y_lim)
    return float(np.trapezoid(ys, xs) / fpr_limit)


def aupro_reference(maps, masks, fpr_limit=0.3, structure=EIGHT) -> float:
    """Sort-and-sweep AUPRO: one descending sort, cumulative sums, one point per distinct score."""
    maps = np.asarray(maps, dtype=np.float64)
    ids, n_regions = label_regions(masks, structure)
    s = maps.ravel()
    ids = ids.ravel()
    normal = ids == 0
    area = np.bincount(ids)
    w_pro = np.where(normal, 0.0, 1.0 / (n_regions * area[ids]))
    w_fpr = normal / normal.sum()
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    fpr = np.cumsum(w_fpr[order])
    pro = np.cumsum(w_pro[order])
    last = np.append(np.flatnonzero(np.diff(s_sorted) != 0), s.size - 1)  # end of every tie group
    return _integrate(fpr[last], pro[last], fpr_limit)


def aupro_bruteforce(maps, masks, fpr_limit=0.3, structure=EIGHT) -> float:
    """Literal definition: for every distinct score t, PRO(t) and FPR(t) counted directly (tiny inputs)."""
    maps = np.asarray(maps, dtype=np.float64)
    ids, n_regions = label_regions(masks, structure)
    normal = maps[ids == 0]
    regions = [maps[ids == r] for r in range(1, n_regions + 1)]
    fpr, pro = [], []
    for t in np.unique(maps)[::-1]:
        fpr.append(np.mean(normal >= t))
        pro.append(np.mean([np.mean(r >= t) for r in regions]))
    return _integrate(np.array(fpr), np.array(pro), fpr_limit)


def random_masks(rng, n, h, w, max_regions=3, max_radius=None, empty_fraction=0.3):
    """Masks with 0..max_regions elliptic blobs each (about `empty_fraction` of them empty)."""
    import cv2

    max_radius = max_radius or max(2, min(h, w) // 4)
    masks = np.zeros((n, h, w), dtype=np.uint8)
    for i in range(n):
        if rng.random() < empty_fraction:
            continue
        for _ in range(rng.integers(1, max_regions + 1)):
            center = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(1, max_radius + 1)), int(rng.integers(1, max_radius + 1)))
            cv2.ellipse(masks[i], center, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return masks


def random_maps(rng, masks, signal=1.5, dtype=np.float32, blur=1.5):
    """Smooth noise + blurred mask signal: realistic, mostly distinct scores."""
    maps = rng.standard_normal(masks.shape) + signal * masks
    maps = ndimage.gaussian_filter(maps, sigma=(0, blur, blur))
    return maps.astype(dtype)
