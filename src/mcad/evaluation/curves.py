"""Curve points as data: ``<run>/curves.json`` beside ``results.json`` (written and read here).

The points are vertices of the exact curves the metrics integrate (:func:`mcad.metrics.roc_points`,
:func:`mcad.metrics.pro_points`: every distinct score is a threshold, a tie group is one diagonal step);
only their number is reduced for drawing (evenly spaced along the curve, ends kept). The metrics in the
results files never come from these points.

``curves.json``::

    {"format": "mcad-curves/1", "max_points": 200, "fpr_limit": 0.3, "pixel_stride": 4,
     "classes": {"bottle": {"image_roc": {"x": [...], "y": [...]},    # FPR, TPR of the image scores
                            "pixel_roc": {"x": [...], "y": [...]},    # FPR, TPR of the map pixels
                            "pro": {"x": [...], "y": [...]}}}}        # FPR <= fpr_limit, PRO

A kind is absent for a class where the curve is undefined (e.g. no anomalous test image) or was not
recorded. The test loop's data come from :class:`mcad.logging.curves.CurveRecorder` (any method).

This module imports neither torch nor lightning at import time, so that ``mcad-report`` starts quickly;
the metric engine is imported when points are computed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mcad.utils.files import atomic_write_text

CURVES_FILE = "curves.json"
CURVES_FORMAT = "mcad-curves/1"
MAX_POINTS = 200
# Curve kinds: (x axis, y axis, the results.json metric that is the area under it).
CURVE_KINDS: dict[str, tuple[str, str, str]] = {
    "image_roc": ("FPR", "TPR", "I-AUROC"),
    "pixel_roc": ("FPR", "TPR", "P-AUROC"),
    "pro": ("FPR", "PRO", "AUPRO"),
}

Points = tuple[Sequence[float], Sequence[float]]


def class_curve_points(
    class_names: Sequence[str] | np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    fpr_limit: float = 0.3,
    max_points: int = MAX_POINTS,
) -> dict[str, dict[str, Points]]:
    """Per-class curve points of one test set, in the form :func:`write_curves` takes.

    Args:
        class_names: ``(N,)`` class of each test image.
        scores: ``(N,)`` image scores.
        labels: ``(N,)`` image labels (0 normal, 1 anomalous).
        maps: Optional ``(N, H, W)`` evaluated maps (any common resolution) for the pixel curves.
        masks: ``(N, H, W)`` binary ground truth aligned with ``maps``.
        fpr_limit: Last FPR of the PRO curve.
        max_points: Points kept per curve.

    Returns:
        ``{class: {"image_roc": (fpr, tpr), "pixel_roc": (fpr, tpr), "pro": (fpr, pro)}}`` in order of first
        appearance; undefined curves are left out.
    """
    from mcad.metrics import pro_points, roc_points

    names = np.asarray([str(c) for c in class_names])
    scores, labels = np.asarray(scores).reshape(-1), np.asarray(labels).reshape(-1)
    if not names.size == scores.size == labels.size:
        raise ValueError(f"class_names, scores and labels differ in length: {names.size}, {scores.size}, {labels.size}")
    if (maps is None) != (masks is None):
        raise ValueError("maps and masks go together")
    out: dict[str, dict[str, Points]] = {}
    for cls in dict.fromkeys(names.tolist()):
        sel = names == cls
        found = {"image_roc": roc_points(scores[sel], labels[sel], max_points)}
        if maps is not None and masks is not None:
            found["pixel_roc"] = roc_points(maps[sel], masks[sel], max_points)
            found["pro"] = pro_points(maps[sel], masks[sel], fpr_limit, max_points)
        out[cls] = {kind: (p[0].tolist(), p[1].tolist()) for kind, p in found.items() if p is not None}
    return out


def write_curves(
    output_dir: str | Path,
    per_class_points: Mapping[str, Mapping[str, Points]],
    fpr_limit: float | None = None,
    pixel_stride: int | None = None,
    max_points: int = MAX_POINTS,
) -> Path:
    """Writes ``<output_dir>/curves.json`` (atomically) from per-class curve points.

    Args:
        output_dir: The run directory (beside ``results.json``).
        per_class_points: ``{class: {kind: (x, y)}}`` with kinds of :data:`CURVE_KINDS`, e.g. from
            :func:`class_curve_points` or :attr:`mcad.logging.curves.CurveRecorder.points`. Curves longer
            than ``max_points`` are thinned (every point kept is one of the given points).
        fpr_limit: FPR limit of the PRO curves, recorded for the plots.
        pixel_stride: Pixel curves were computed on every ``pixel_stride``-th row and column of the maps
            (1: every pixel), recorded so the plots can say so.
        max_points: Most points stored per curve.

    Returns:
        The path written.

    Raises:
        ValueError: On an unknown curve kind, ``x`` and ``y`` of different lengths, or a non-finite point.
    """
    classes: dict[str, dict[str, dict[str, list[float]]]] = {}
    for cls, curves in per_class_points.items():
        entry = {}
        for kind, (xs, ys) in curves.items():
            if kind not in CURVE_KINDS:
                raise ValueError(f"Unknown curve kind {kind!r} of class {cls!r}; expected one of {list(CURVE_KINDS)}")
            x, y = [float(v) for v in xs], [float(v) for v in ys]
            if len(x) != len(y) or not x:
                raise ValueError(f"Curve {kind} of class {cls!r}: {len(x)} x and {len(y)} y values")
            if not all(math.isfinite(v) for v in (*x, *y)):
                raise ValueError(f"Curve {kind} of class {cls!r} has non-finite points")
            if len(x) > max_points:
                from mcad.metrics import thin_curve

                thin_x, thin_y = thin_curve(np.asarray(x), np.asarray(y), max_points)
                x, y = thin_x.tolist(), thin_y.tolist()
            entry[kind] = {"x": x, "y": y}
        classes[str(cls)] = entry
    record: dict[str, Any] = {"format": CURVES_FORMAT, "max_points": max_points, "fpr_limit": fpr_limit,
                              "pixel_stride": pixel_stride, "classes": classes}  # fmt: skip
    path = Path(output_dir) / CURVES_FILE
    atomic_write_text(path, json.dumps(record, separators=(",", ":")) + "\n")
    return path


def read_curves(run_dir: str | Path) -> dict[str, Any] | None:
    """The ``curves.json`` of a run, or ``None`` when it has none.

    Raises:
        ValueError: The file exists but is not a curves file of this format.
    """
    path = Path(run_dir) / CURVES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Unreadable {path}: {err}") from err
    if not isinstance(record, dict) or record.get("format") != CURVES_FORMAT:
        raise ValueError(f"{path} is not a {CURVES_FORMAT} file")
    return record
