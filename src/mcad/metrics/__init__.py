"""Exact anomaly-detection metrics (image and pixel level, AUPRO)."""

from mcad.metrics._table import IMAGE_METRICS, METRIC_NAMES, PIXEL_METRICS, compute_metrics
from mcad.metrics.functional import (
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_metrics,
    f1_max,
    pixel_metrics,
    pro_points,
    roc_points,
    thin_curve,
)

__all__ = [
    "IMAGE_METRICS",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "compute_metrics",
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
