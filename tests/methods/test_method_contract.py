"""Every method config honours the one contract: build, train a step, test, resume, carry a plug-in, export.

Parametrised over ``conf/method/*.yaml``, so a new method is covered the moment its config exists. Each run is
tiny (2 synthetic classes at 64 px, a randomly initialised Lite0) and goes through the real entry points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import TINY
from mcad.build import build_components
from mcad.config import config_dir
from mcad.evaluation.protocol import AnomalyMaps
from mcad.methods.plugins import ContrastiveMethod
from mcad.train import train

METHODS = sorted(p.stem for p in (Path(config_dir()) / "method").glob("*.yaml"))

# What each method needs on top of TINY to fit 64-px Lite0 features and a one-step budget.
SMALL = {
    "rd": [],
    "ccl_rd": [],
    "rlr": ["decoder.window_sizes=[3,3]", "decoder.num_layers=1", "decoder.hidden_base=16", "decoder.num_heads=2"],
    "crr": ["data.crop_size=null", "decoder.embed_dim=64", "method.seg_head.base_width=8",
            "method.seg_head.num_stages=2", "method.seg_head.final_width=8", "method.seg_head.output_size=[32,32]",
            "method.stage1_steps=2", "method.stage2_steps=2", "method.stage2_batch_size=4",
            "method.scheduler.warmup_steps=1", "method.hard_mining_ramp=2"],
    "dinomaly": ["data.crop_size=null", "decoder.embed_dim=64", "method.stage1_steps=2",
                 "method.scheduler.warmup_steps=1", "method.hard_mining_ramp=2"],
}  # fmt: skip


def _overrides(name: str, *extra: str) -> list[str]:
    return [f"method={name}", *TINY, "trainer.max_steps=2", *SMALL.get(name, []), *extra]


def test_every_method_config_is_covered():
    assert set(METHODS) <= set(SMALL), f"add the new method's small settings to SMALL: {set(METHODS) - set(SMALL)}"


@pytest.mark.parametrize("name", METHODS)
def test_builds_trains_tests_and_resumes(name, make_config, tmp_path, two_threads):
    run = tmp_path / "run"
    cfg = make_config(_overrides(name), run)
    method, _ = build_components(cfg)
    out = method.anomaly_maps(torch.randn(2, 3, 64, 64))
    assert isinstance(out, AnomalyMaps)
    results = train(cfg)
    assert set(results["per_class"]) == {"stripes", "disk"} and np.isfinite(results["mean"]["P-AUROC"])
    saved = json.loads((run / "results.json").read_text())
    assert saved["method"] == name and (run / "report.html").is_file() and (run / "curves.json").is_file()
    # resume: the latest checkpoint continues the run (one more epoch or step budget) and tests again
    ckpts = sorted(run.glob("checkpoints/**/last.ckpt"))
    assert ckpts, "a trained run leaves last.ckpt"
    resumed = train(make_config(_overrides(name, "ckpt_path=last", "trainer.max_steps=3", "trainer.max_epochs=2"), run))
    assert np.isfinite(resumed["mean"]["I-AUROC"])


@pytest.mark.parametrize("name", METHODS)
def test_carries_the_ccl_plugin_when_it_offers_contrastive_features(name, make_config, tmp_path, two_threads):
    cfg = make_config(_overrides(name, "loss=ccl", "loss.view_source=resized"), tmp_path / "run")
    method, _ = build_components(cfg)
    if not isinstance(method, ContrastiveMethod):
        pytest.skip(f"{name} offers no contrastive features")
    results = train(cfg)
    assert results["class_labels"] == {"source": "gt", "num_classes": 2}
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/ccl_dense_epoch" in header and "train/ccl_global_epoch" in header


@pytest.mark.parametrize("name", METHODS)
def test_exports_to_onnx_with_the_pytorch_maps(name, make_config, tmp_path):
    pytest.importorskip("onnxruntime")
    from mcad.export import export_onnx, onnx_max_difference

    cfg = make_config(_overrides(name), tmp_path / "run")
    method, datamodule = build_components(cfg)
    method.eval()
    path = export_onnx(method, datamodule.input_size, tmp_path / "model.onnx", metadata={"method": name})
    # onnxruntime reproduces PyTorch's evaluated maps and scores (export's own acceptance bound)
    assert onnx_max_difference(method, path, datamodule.input_size) <= 1e-4
