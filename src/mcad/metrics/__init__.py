"""Exact anomaly-detection metrics (image and pixel level, AUPRO)."""

from mcad.metrics.functional import (
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    binary_metrics,
    f1_max,
    pixel_metrics,
)

__all__ = [
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "binary_metrics",
    "f1_max",
    "pixel_metrics",
]
