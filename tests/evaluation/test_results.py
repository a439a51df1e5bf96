import csv
import json
import math

from mcad.evaluation.results import metrics_markdown, write_results


def test_results_files(tmp_path):
    per_class = {"a": {"I-AUROC": 0.98765, "mAD": 0.5}, "b": {"I-AUROC": float("nan"), "mAD": 0.25}}
    mean = {"I-AUROC": 0.98765, "mAD": 0.375}
    write_results(tmp_path, {"per_class": per_class, "mean": mean, "method": "rd"})
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["per_class"]["a"]["I-AUROC"] == 0.98765 and data["per_class"]["b"]["I-AUROC"] is None
    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [r["class"] for r in rows] == ["a", "b", "mean"]
    assert math.isclose(float(rows[2]["mAD"]), 0.375)
    md = (tmp_path / "metrics.md").read_text()
    assert "| a | 98.8 | 50.0 |" in md and "| **mean** | 98.8 | 37.5 |" in md
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


def test_markdown_has_one_decimal_percent():
    md = metrics_markdown({"x": {"P-AUROC": 0.9512}}, {"P-AUROC": 0.9512})
    assert "95.1" in md
