import json

import lightning as L
import pytest

from mcad.build import build_components
from mcad.runs import load_trained_method
from mcad.train import train


@pytest.mark.parametrize("width, trainable, total", [(64, 55_747_072, 80_609_600), (128, 83_802_624, 108_665_152)])
def test_rd_parameter_counts_match_the_official_models(make_config, width, trainable, total):
    # ADer (OCBE width 64) and RD4AD (width 128), teacher truncated after layer 3 (errata E-RD1).
    cfg = make_config(["method=rd", "backbone.pretrained=false", f"method.ocbe.base_width={width}"])
    method, _ = build_components(cfg)
    counts = method.parameter_counts()
    assert counts["params_trainable"] == trainable
    assert counts["params_total"] == total


def test_rd_trains_and_separates_defects_on_synthetic_data(make_config, fast_data, tmp_path):
    cfg = make_config(["method=rd", "backbone=tf_efficientnet_lite0", "trainer.max_epochs=10", *fast_data])
    results = train(cfg)
    assert results["mean"]["I-AUROC"] > 0.9, results["per_class"]
    assert results["mean"]["P-AUROC"] > 0.9, results["per_class"]
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["method"] == "rd" and saved["data"] == "synthetic"
    assert set(saved["per_class"]) == {"stripes", "checker", "disk", "nut"}
    assert saved["efficiency"]["params_trainable"] > 0 and saved["efficiency"]["train_images_per_second"] > 0
    assert saved["protocol"]["name"] == "mcad"
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / "metrics.md").read_text().count("|") > 20

    # the checkpoint restores the trained weights: a rebuilt method with them evaluates to the same metrics,
    # one without them does not
    def evaluate(method, datamodule):
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
        trainer.test(method, datamodule=datamodule, verbose=False)
        return method.test_results["mean"]

    restored, dm = load_trained_method(cfg, tmp_path / "run" / "checkpoints" / "last.ckpt")
    again = evaluate(restored, dm)
    assert again == pytest.approx(results["mean"], abs=1e-6)
    fresh, dm = build_components(cfg)
    assert evaluate(fresh, dm)["P-AUROC"] != pytest.approx(results["mean"]["P-AUROC"], abs=1e-3)


@pytest.mark.slow
def test_rd_real_data_proxy_meets_the_targets(make_config, real_data_root):
    """One RD model on bottle + cookie (Lite0 stages at strides 8/16/32, experiment=proxy_rd: 10 epochs).

    Issue 2's bar: I-AUROC >= 0.98 and P-AUROC >= 0.95 on both classes. Measured (2 cores): seed 42 bottle
    1.000 / 0.983, cookie 1.000 / 0.979; cookie over seeds 0, 1, 2: 0.993-1.000 / 0.974-0.975 (method README).
    """
    cfg = make_config(["experiment=proxy_rd", f"data.root={real_data_root}", "trainer.enable_progress_bar=false"])
    results = train(cfg)
    bottle, cookie = results["per_class"]["bottle"], results["per_class"]["cookie"]
    assert bottle["I-AUROC"] >= 0.98 and bottle["P-AUROC"] >= 0.95, bottle
    # Cookie's image floor is the bar's per-seed floor (0.96): one good photo (test-normal-1) scores just under
    # the lowest defect (0.768 vs 0.778 at seed 0), so a run on another CPU can misorder a few of the 14 x 32 pairs.
    assert cookie["I-AUROC"] >= 0.96 and cookie["P-AUROC"] >= 0.95, cookie
