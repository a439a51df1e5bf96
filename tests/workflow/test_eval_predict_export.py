"""mcad-eval, mcad-predict and mcad-export on a tiny trained run; ONNX parity with PyTorch."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from workflow_helpers import compose_entry

from mcad.build import build_components
from mcad.evaluate import evaluate
from mcad.export import export, export_onnx, onnx_max_difference
from mcad.predict import predict


def test_eval_reproduces_the_run_and_switches_protocol(tiny_run, tmp_path, cache_dir):
    run, results = tiny_run
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"ckpt_path={ckpt}", f"+set.paths.cache_dir={cache_dir}", "print_table=false"]
    again = evaluate(compose_entry("eval", [*common, f"output_dir={tmp_path / 'same'}"]))
    assert again["method"] == "rd" and again["protocol"] == results["protocol"]
    for name, value in results["mean"].items():
        assert again["mean"][name] == pytest.approx(value, abs=1e-9), name
    assert (tmp_path / "same" / "results.json").is_file()
    assert json.loads((run / "results.json").read_text())["mean"] == results["mean"]  # the run is untouched

    other = evaluate(
        compose_entry(
            "eval",
            [*common, f"output_dir={tmp_path / 'gt0'}", "protocol=dinomaly_gt0", "+set.protocol.eval_size=64"],
        )
    )
    assert other["protocol"]["name"] == "dinomaly_gt0"
    assert other["protocol"]["gt_threshold"] == 0.0 and other["protocol"]["image_score"] == "topk_mean"
    assert json.loads((tmp_path / "gt0" / "results.json").read_text())["protocol"]["name"] == "dinomaly_gt0"
    assert other["mean"] != results["mean"]


def test_predict_writes_maps_scores_and_decisions(tiny_run, tmp_path):
    run, results = tiny_run
    datamodule = instantiate(OmegaConf.create(results["config"]["data"]))
    test_root = next(Path(r.image_path).parents[1] for r in datamodule.records("test") if r.class_name == "disk")
    out = tmp_path / "pred"
    summary = predict(
        compose_entry(
            "predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={test_root}", f"output={out}"]
        )
    )
    images = sorted(test_root.rglob("*.png"))
    assert len(summary["rows"]) == len(images) == 4
    for image in images:
        rel = image.relative_to(test_root).with_suffix("")
        amap = np.load(out / "maps" / rel.with_suffix(".npy"))
        assert amap.shape == (64, 64) and amap.dtype == np.float32
        assert (out / "maps" / rel.with_suffix(".png")).is_file()
        assert (out / "masks" / rel.with_suffix(".png")).is_file()
    rows = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    threshold = json.loads((out / "threshold.json").read_text())
    assert threshold["calibration_images"] == 16 and threshold["quantile"] == 1.0
    # the image threshold is the highest calibration (training) score, and the decision follows it
    assert threshold["image_threshold"] == pytest.approx(threshold["calibration_score_range"][1])
    for row in rows:
        assert int(row["anomalous"]) == int(float(row["score"]) > threshold["image_threshold"])


@pytest.mark.parametrize("postprocess", [True, False])
def test_onnx_export_matches_pytorch(make_config, tmp_path, postprocess):
    """RD on an untrained Lite0 (pretrained weights are not needed for parity) at 64 px."""
    cfg = make_config(["method=rd", "backbone=tf_efficientnet_lite0", "backbone.pretrained=false",
                       "backbone.weights_source=null", "data.image_size=64", "protocol.eval_size=64"])  # fmt: skip
    method, _ = build_components(cfg)
    torch.manual_seed(0)
    with torch.no_grad():  # non-trivial decoder weights and BatchNorm statistics
        for p in method.model.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = export_onnx(method.eval(), 64, tmp_path / "rd.onnx", postprocess=postprocess)
    assert onnx_max_difference(method, path, 64, postprocess, batch_size=3) <= 1e-4


def test_export_entry_point_from_a_checkpoint(tiny_run, tmp_path):
    run, _ = tiny_run
    out = tmp_path / "model.onnx"
    record = export(compose_entry("export", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"output={out}"]))
    assert out.is_file() and record["max_abs_difference"] <= 1e-4
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["input_size"] == 64 and sidecar["protocol"]["eval_size"] == 64


def test_eval_needs_the_run_config(tmp_path):
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {}}, ckpt)
    with pytest.raises(FileNotFoundError, match="run_dir"):
        evaluate(compose_entry("eval", [f"ckpt_path={ckpt}", f"output_dir={tmp_path / 'e'}"]))
