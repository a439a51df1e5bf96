"""The Real-IAD / BTAD recipes as configs: their official values, and CRR's recipe end to end on a miniature."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from mcad.config.validate import validate_config
from mcad.train import train


def _miniatures():
    # The Real-IAD miniature builder lives with the format tests (tests/ is not a package).
    path = Path(__file__).resolve().parents[1] / "data" / "test_formats.py"
    spec = importlib.util.spec_from_file_location("_format_miniatures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crr_realiad_recipe_holds_the_official_values(make_config):
    cfg = make_config(["experiment=crr_realiad", "backbone.pretrained=false"])
    validate_config(cfg)
    assert (cfg.seed, cfg.task_name, cfg.data.name, cfg.trainer.accelerator) == (1, "crr_realiad", "realiad", "gpu")
    assert dict(cfg.data.options) == {"resolution": 1024, "jsons": "realiad_jsons", "views": None}
    assert (cfg.data.image_size, cfg.data.crop_size, cfg.data.batch_size, cfg.data.drop_last) == (448, 392, 16, True)
    assert (cfg.method.stage1_steps, cfg.method.stage2_steps, cfg.method.stage2_batch_size) == (50_000, 8_000, 8)
    assert (cfg.decoder.dropout, cfg.decoder.mask_ratio, cfg.synthesizer.foreground) == (0.4, 0.4, "otsu")
    p = cfg.protocol
    assert (p.name, p.seg_weight, p.image_score, p.topk_ratio, p.eval_size, p.kernel_size) == (
        "dinomaly", 0.3, "topk_mean", 0.01, 256, 5,
    )  # fmt: skip
    assert cfg.trainer.gradient_clip_val == 0.1


@pytest.mark.parametrize(
    "experiment, data, method, options, epochs",
    [
        ("rd_realiad", "realiad", "rd", {"resolution": 1024, "jsons": "realiad_jsons", "views": None}, 100),
        ("ccl_rd_realiad", "realiad", "ccl_rd", {"resolution": 512, "jsons": "realiad_jsons", "views": None}, 100),
        ("ccl_rd_btad", "btad", "ccl_rd", None, 100),
    ],
)
def test_rd_and_ccl_recipes_hold_the_official_values(make_config, experiment, data, method, options, epochs):
    cfg = make_config([f"experiment={experiment}"])
    validate_config(cfg)
    assert (cfg.task_name, cfg.data.name, cfg.method_name, cfg.seed) == (experiment, data, method, 42)
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.trainer.max_epochs) == (256, 16, epochs)
    assert (dict(cfg.data.options) if options is not None else None) == options


@pytest.mark.slow
def test_crr_realiad_recipe_trains_and_evaluates_on_the_miniature(make_config, tmp_path, two_threads):
    root = _miniatures().make_realiad(tmp_path / "Real-IAD", "nested")
    run = tmp_path / "run"
    overrides = [
        "experiment=crr_realiad", f"data.root={root}", "backbone.pretrained=false",
        # what a CPU test needs, the recipe otherwise: the miniature's objects, a CPU, a few steps, small images
        "data.classes=[audiojack,plastic_nut]", "trainer.accelerator=cpu", "trainer.benchmark=false",
        "method.stage1_steps=2", "method.stage2_steps=2", "data.batch_size=2", "method.stage2_batch_size=2",
        "data.image_size=32", "data.crop_size=28", "backbone.img_size=28", "data.eval_batch_size=10",
        "data.num_workers=0", "count_flops=false", "print_table=false", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    results = train(make_config(overrides, run))
    assert sorted(results["per_class"]) == ["audiojack", "plastic_nut"]
    assert all(0.0 <= results["mean"][k] <= 1.0 for k in ("I-AUROC", "P-AUROC", "AUPRO"))
    saved = json.loads((run / "results.json").read_text())
    assert saved["method"] == "crr" and saved["protocol"]["name"] == "dinomaly"
    assert saved["config"]["data"]["options"]["jsons"] == "realiad_jsons"
    eff = saved["efficiency"]
    assert eff["stage1/train_images"] == 2 * 2 and eff["stage2/train_images"] == 2 * 2
    for phase in ("stage1", "stage2"):
        assert (run / "checkpoints" / phase / "last.ckpt").is_file()
