"""Results files of a run: ``results.json``, ``metrics.csv`` and ``metrics.md``, written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mcad.utils.files import atomic_write_text

METRIC_COLUMNS = ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO", "mAD")


def _rows(
    per_class: Mapping[str, Mapping[str, float]], mean: Mapping[str, float]
) -> list[tuple[str, Mapping[str, float]]]:
    return [*per_class.items(), ("mean", dict(mean))]


def _fmt(value: Any, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if not percent else "–"
    return f"{100 * value:.1f}" if percent else f"{value:.6f}"


def metrics_markdown(per_class: Mapping[str, Mapping[str, float]], mean: Mapping[str, float]) -> str:
    """Per-class table plus the mean row, in percent with one decimal (as papers print them)."""
    columns = [c for c in METRIC_COLUMNS if c in mean or any(c in v for v in per_class.values())]
    lines = ["| class | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, values in _rows(per_class, mean):
        label = f"**{name}**" if name == "mean" else name
        lines.append(f"| {label} | " + " | ".join(_fmt(values.get(c), True) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def metrics_csv(per_class: Mapping[str, Mapping[str, float]], mean: Mapping[str, float]) -> str:
    """Per-class table plus the mean row as CSV fractions in full precision."""
    columns = [c for c in METRIC_COLUMNS if c in mean or any(c in v for v in per_class.values())]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *columns])
    for name, values in _rows(per_class, mean):
        writer.writerow([name, *(repr(float(values[c])) if c in values else "" for c in columns)])
    return buf.getvalue()


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_results(output_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """Writes the three results files of one evaluation.

    Args:
        output_dir: The run directory.
        results: At least ``per_class`` and ``mean``; written as given to ``results.json``
            (NaN/Inf become ``null``).

    Returns:
        The paths written, by name.
    """
    out = Path(output_dir)
    paths = {"json": out / "results.json", "csv": out / "metrics.csv", "md": out / "metrics.md"}
    atomic_write_text(paths["csv"], metrics_csv(results["per_class"], results["mean"]))
    atomic_write_text(paths["md"], metrics_markdown(results["per_class"], results["mean"]))
    # results.json last: its presence marks a finished evaluation.
    atomic_write_text(paths["json"], json.dumps(_json_safe(dict(results)), indent=2, allow_nan=False) + "\n")
    return paths
