"""Every logger option runs offline and receives the test metrics."""

import csv

import pytest

from mcad.train import train


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_logger_receives_test_metrics(make_config, fast_data, tmp_path, monkeypatch, logger):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = make_config(
        ["experiment=quickstart", *fast_data, "trainer.max_epochs=1", f"logger={logger}", "count_flops=false"]
    )
    results = train(cfg)
    run = tmp_path / "run"
    assert (run / "results.json").is_file()
    if logger == "csv":
        rows = list(csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()))
        logged = {k for row in rows for k, v in row.items() if v}
        assert {"test/I-AUROC", "test/mAD", "test/disk/P-AUROC", "train/loss_epoch"} <= logged
        test_row = next(r for r in rows if r.get("test/mAD"))
        assert float(test_row["test/mAD"]) == pytest.approx(results["mean"]["mAD"], abs=1e-6)
    elif logger == "tensorboard":
        assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    else:
        runs = list((run / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
