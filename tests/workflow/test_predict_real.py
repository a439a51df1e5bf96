"""mcad-predict (the console entry point, in a subprocess) on the real bottle test images with a checkpoint
trained on the real-data proxy (tiny budget: one epoch on 16 images per class at 128 px)."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from workflow_helpers import REPO, run_cli


@pytest.mark.slow
def test_predict_on_real_bottle_images(monkeypatch, tmp_path, cache_dir, real_data_root):
    run = tmp_path / "proxy"
    run_cli(monkeypatch, ["experiment=proxy_rd", f"data.root={real_data_root}", "trainer.max_epochs=1",
                          "+data.max_train_per_class=16", "data.image_size=128", "data.num_workers=0", "test=false",
                          "trainer.enable_progress_bar=false", f"hydra.run.dir={run}",
                          f"paths.cache_dir={cache_dir}"])  # fmt: skip
    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (run / ".hydra" / "config.yaml").is_file()

    images = real_data_root / "bottle" / "test"
    out = tmp_path / "pred"
    command = [sys.executable, "-m", "mcad.predict", f"ckpt_path={ckpt}", f"input={images}", f"output={out}",
               "calibration_max_images=16"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    files = sorted(p for p in images.rglob("*.png"))
    maps = sorted((out / "maps").rglob("*.npy"))
    pngs = sorted((out / "maps").rglob("*.png"))
    assert len(files) == len(maps) == len(pngs) == 83
    assert np.load(maps[0]).shape == (256, 256)
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert len(rows) == len(files) and {r["anomalous"] for r in rows} <= {"0", "1"}
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["calibration_images"] == 16 and threshold["image_threshold"] is not None
