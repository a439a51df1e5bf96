"""RD against numbers recorded from the official code (``tests/fixtures/parity/rd.json``, ``rd4ad.json``).

The fixtures were written by ``experiments/parity/rd.py --write-fixture`` from ADer 902937a and RD4AD 6554076
with weights copied from ours. Here only our side is rebuilt from the same config overrides and seeds, so the
test runs without any official code: parameter counts, the anomaly map at evaluation size and the image scores
(official maps put on our scale: ADer divides the level sum by 9, RD4AD sums, ours averages), the training loss,
the gradient norm, and an official-format checkpoint (rebuilt from its manifest) imported with
``mcad.methods.rd.official.convert_official_checkpoint``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from parity_helpers import FIXTURES, check_maps, close, n_params, parity_script

from mcad.methods.rd.official import convert_official_checkpoint
from mcad.utils.seeded import seeded_images, seeded_init_

# The fixture tests build a WRN50-2 model, run one training step and a checkpoint import: about 20 s of CPU
# per fixture on two cores (30-40 s wall on a loaded machine).
slow = pytest.mark.slow


@pytest.fixture(scope="module", params=["rd", "rd4ad"])
def rebuilt(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Our side of one fixture, computed once: counts, eval maps, train loss and gradient norm, checkpoint maps."""
    fx = json.loads((FIXTURES / f"{request.param}.json").read_text())
    common = parity_script("common")
    label = f"RD ({fx['variant']}: {fx['official']['repo']}@{fx['official']['commit']})"
    method = common.build_method(fx["overrides"])
    seeded_init_(method.model, fx["seed"])
    spec = fx["input"]
    images = seeded_images(spec["seed"], spec["batch"], spec["size"])
    model = method.model
    out: dict[str, Any] = {"fx": fx, "label": label}
    out["params"] = {
        "teacher": n_params(model.teacher),
        "ocbe": n_params(model.ocbe),
        "decoder": n_params(model.decoder),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    out["maps"], out["scores"] = common.evaluate_images(method, images)
    method.train()
    loss = method.training_losses({"image": images})["loss"]
    loss.backward()
    out["loss"] = loss.item()
    out["grad_norm"] = common.grad_norm([p for p in model.parameters() if p.requires_grad])
    ckpt = fx["checkpoint"]
    official_file = common.rebuild_from_manifest(ckpt["manifest"], ckpt["seed"])
    method.load_state_dict(convert_official_checkpoint(official_file, reference=method.state_dict()))
    out["ckpt_maps"], out["ckpt_scores"] = common.evaluate_images(method, images)
    return out


@slow
def test_parameter_counts(rebuilt: dict[str, Any]) -> None:
    for key, official in rebuilt["fx"]["params"].items():
        assert rebuilt["params"][key] == official, (
            f"{rebuilt['label']}: {key} has {rebuilt['params'][key]:,} parameters, the official {official:,}"
        )


@slow
def test_anomaly_map_and_scores(rebuilt: dict[str, Any]) -> None:
    check_maps(
        f"{rebuilt['label']}: anomaly map at evaluation size", rebuilt["maps"], rebuilt["scores"], rebuilt["fx"]["map"]
    )


@slow
def test_training_loss(rebuilt: dict[str, Any]) -> None:
    close(f"{rebuilt['label']}: global-cosine loss (train mode)", rebuilt["loss"], rebuilt["fx"]["losses"]["cos"])


@slow
def test_gradient_norm(rebuilt: dict[str, Any]) -> None:
    official = rebuilt["fx"]["grad_norm"]
    close(
        f"{rebuilt['label']}: gradient norm before clipping", rebuilt["grad_norm"], official, 1e-5 * max(1.0, official)
    )


@slow
def test_official_checkpoint_import(rebuilt: dict[str, Any]) -> None:
    fmt = rebuilt["fx"]["checkpoint"]["format"]
    check_maps(
        f"{rebuilt['label']}: {fmt} checkpoint imported with convert_official_checkpoint",
        rebuilt["ckpt_maps"],
        rebuilt["ckpt_scores"],
        rebuilt["fx"]["checkpoint"]["map"],
    )


# ------------------------------------------------------------------------------------------ converter errors
def _reference() -> dict[str, torch.Tensor]:
    return {
        "model.teacher.model.conv1.weight": torch.zeros(4, 3, 3, 3),
        "model.ocbe.conv1.weight": torch.zeros(8, 4, 3, 3),
        "model.ocbe.embed.0.conv1.weight": torch.zeros(8, 24, 1, 1),
        "model.decoder.stages.0.0.conv1.weight": torch.zeros(8, 16, 1, 1),
    }


def test_converter_maps_both_official_formats() -> None:
    ref = _reference()
    rd4ad = {
        "bn": {
            "conv1.weight": torch.ones(8, 4, 3, 3),
            "bn_layer.0.conv1.weight": torch.ones(8, 24, 1, 1),
            "conv4.weight": torch.ones(2, 2, 1, 1),
            "bn4.weight": torch.ones(2),
            "memory.bank": torch.ones(1),
        },
        "decoder": {"layer1.0.conv1.weight": torch.ones(8, 16, 1, 1)},
    }
    out = convert_official_checkpoint(rd4ad, reference=ref)
    assert set(out) == set(ref)  # conv4 / bn4 / memory dropped, the teacher taken from the reference
    assert out["model.teacher.model.conv1.weight"] is ref["model.teacher.model.conv1.weight"]
    assert float(out["model.ocbe.embed.0.conv1.weight"].sum()) == 8 * 24
    ader = {
        "net": {
            "module.net_t.conv1.weight": torch.ones(4, 3, 3, 3),
            "mff_oce.conv1.weight": torch.ones(8, 4, 3, 3),
            "mff_oce.bn_layer.0.conv1.weight": torch.ones(8, 24, 1, 1),
            "net_s.layer1.0.conv1.weight": torch.ones(8, 16, 1, 1),
        },
        "optimizer": {},
        "epoch": 3,
    }
    out = convert_official_checkpoint(ader, reference=ref)
    assert all(float(v.sum()) == v.numel() for v in out.values())  # everything from the file, teacher included


def test_converter_names_missing_unexpected_and_misshapen_keys() -> None:
    from mcad.methods.rd.official import OfficialCheckpointError

    ref = _reference()
    net = {
        "net_t.conv1.weight": torch.ones(4, 3, 3, 3),
        "mff_oce.conv1.weight": torch.ones(8, 4, 5, 5),
        "mff_oce.extra.weight": torch.ones(1),
        "net_s.layer1.0.conv1.weight": torch.ones(8, 16, 1, 1),
    }
    with pytest.raises(OfficialCheckpointError) as err:
        convert_official_checkpoint({"net": net}, reference=ref)
    text = str(err.value)
    assert "model.ocbe.extra.weight" in text  # unexpected
    assert "model.ocbe.embed.0.conv1.weight" in text  # missing
    assert "model.ocbe.conv1.weight: file (8, 4, 5, 5) vs method (8, 4, 3, 3)" in text
    with pytest.raises(OfficialCheckpointError, match="Not an official RD checkpoint"):
        convert_official_checkpoint({"state_dict": {"encoder.weight": torch.ones(1)}})
