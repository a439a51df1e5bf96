"""logger=wandb under WANDB_MODE=offline: metrics, per-class table, map overlays, curves, efficiency, tags;
visualize=true: PNG overlays in the run directory."""

import csv
import json

import cv2
import pytest
from workflow_helpers import TINY, compose_config, read_offline_run

from mcad.train import train


def test_wandb_offline_run_and_png_overlays(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    results = train(
        compose_config(
            ["method=rd", *TINY, "logger=wandb", "visualize=true", "trainer.log_every_n_steps=1"], run, cache_dir
        )
    )

    # --- W&B: the offline run's records and media files
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    record = read_offline_run(offline[0])
    assert record["complete"]
    summary = record["summary"]
    assert float(summary["test/mAD"]) == pytest.approx(results["mean"]["mAD"], abs=1e-6)
    assert float(summary["test/disk/P-AUROC"]) == pytest.approx(results["per_class"]["disk"]["P-AUROC"], abs=1e-6)
    assert "train/loss_step" in record["history_keys"]
    assert {"method=rd", "data=synthetic", "backbone=tf_efficientnet_lite0"} <= set(record["tags"])
    assert {"method", "data", "trainer", "protocol"} <= record["config_keys"]
    assert "efficiency/params_trainable" in summary
    files = offline[0] / "files" / "media"
    table = next((files / "table" / "test").glob("per_class_*.table.json"))
    rows = json.loads(table.read_text())
    assert rows["columns"][:3] == ["class", "I-AUROC", "I-AP"]
    assert [r[0] for r in rows["data"]] == ["stripes", "disk", "mean"]
    images = list((files / "images" / "test").glob("anomaly_maps_*.png"))
    assert len(images) == 2 * 3  # 2 classes x (2 anomalous + 1 normal), the fixed set
    for curve in ("image_roc", "pixel_roc", "pro"):
        assert list((files / "table" / "test" / "curves").glob(f"{curve}_table_*.table.json")), curve
    # the run was finished (a next sweep job starts its own)
    import wandb

    assert wandb.run is None

    # --- visualize=true: 4 PNGs per class (2 lowest-scored anomalous, 2 highest-scored normal)
    index = list(csv.DictReader((run / "visualizations" / "index.csv").read_text().splitlines()))
    assert len(index) == 8
    for row in index:
        image = cv2.imread(str(run / "visualizations" / row["file"]))
        assert image is not None and image.shape[1] == 4 * 64  # four 64-px tiles side by side
    disk = [r for r in index if r["class"] == "disk"]
    assert [r["label"] for r in disk] == ["1", "1", "0", "0"]
    anomalous = [float(r["score"]) for r in disk if r["label"] == "1"]
    assert anomalous == sorted(anomalous)  # lowest-scored defect first
