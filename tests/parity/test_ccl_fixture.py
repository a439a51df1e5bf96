"""CCL on RD against numbers recorded from both official code versions (``ccl_v1.json``, ``ccl_head.json``).

The fixtures were written by ``experiments/parity/ccl.py --write-fixture`` from LGC-AD/AD-LGC 204b215 (v1) and
6502f68 (HEAD) with weights copied from ours, feature noise off on both sides and the dense-loss negatives drawn
from the same global-RNG seed. Here only our side is rebuilt, without any official code: the configured global
term (HEAD: the recipe default must be ``ccl_head``), parameter counts, the anomaly map and image scores, the
three losses of one training step, the gradient norm, and an AD-LGC checkpoint (rebuilt from its manifest)
imported with ``mcad.methods.ccl_rd.official.convert_official_checkpoint``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from parity_helpers import FIXTURES, check_maps, close, n_params, parity_script

from mcad.methods.ccl_rd.official import convert_official_checkpoint
from mcad.utils.seeded import seeded_images, seeded_init_

# The fixture tests build a WRN50-2 model, run one training step and a checkpoint import: about 20 s of CPU
# per fixture on two cores (30-40 s wall on a loaded machine).
slow = pytest.mark.slow


def plugin(method: Any) -> Any:
    # `loss_plugin` since the plug-in refactoring; `ccl` at c9d8543 (so that the test also runs there).
    return getattr(method, "loss_plugin", None) or method.ccl


def training_terms(method: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss terms of our training step (``AnomalyModule.training_step`` with the CCL plug-in)."""
    if getattr(method, "loss_plugin", None) is None:  # c9d8543: the method computed the terms itself
        losses = method.training_losses(batch)
        return {"cos": losses["cos"], "dense": losses["dense"], "global": losses["global"], "total": losses["loss"]}
    losses, features = method.contrastive_forward(batch)
    extra = method.loss_plugin(features, batch)
    total = losses["loss"] + sum(extra.values())
    return {"cos": losses["cos"], "dense": extra["ccl_dense"], "global": extra["ccl_global"], "total": total}


@pytest.fixture(scope="module", params=["ccl_v1", "ccl_head"])
def rebuilt(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Our side of one fixture, computed once."""
    fx = json.loads((FIXTURES / f"{request.param}.json").read_text())
    common = parity_script("common")
    label = f"CCL-on-RD ({fx['variant']}: {fx['official']['repo']}@{fx['official']['commit']})"
    method = common.build_method(fx["overrides"])
    seeded_init_(method.model, fx["seed"])
    spec = fx["input"]
    images = seeded_images(spec["seed"], spec["batch"], spec["size"])
    view = spec["second_view"]
    images_aug = torch.roll(torch.flip(images, dims=view["flip"]), shifts=view["shift"], dims=(2, 3))
    labels = torch.tensor(spec["labels"])
    model = method.model
    out: dict[str, Any] = {"fx": fx, "label": label, "global_cl": plugin(method).terms.global_cl}
    out["params"] = {
        "teacher": n_params(model.teacher),
        "ocbe": n_params(model.rd.ocbe),
        "decoder": n_params(model.rd.decoder),
        "proj": n_params(model.proj),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    out["maps"], out["scores"] = common.evaluate_images(method, images)
    method.train()
    torch.manual_seed(spec["loss_seed"])  # the dense term's negatives come from the global RNG, as officially
    batch = {"image": images, "image_aug": images_aug, "class_id": labels, "contrast_label": labels}
    losses = training_terms(method, batch)
    losses["total"].backward()
    out["losses"] = {k: v.item() for k, v in losses.items()}
    out["grad_norm"] = common.grad_norm([p for p in model.parameters() if p.requires_grad])
    ckpt = fx["checkpoint"]
    official_file = common.rebuild_from_manifest(ckpt["manifest"], ckpt["seed"])
    method.load_state_dict(convert_official_checkpoint(official_file, reference=method.state_dict()))
    out["ckpt_maps"], out["ckpt_scores"] = common.evaluate_images(method, images)
    return out


@slow
def test_global_term_is_the_official_one(rebuilt: dict[str, Any]) -> None:
    expected = rebuilt["fx"]["global_cl"]
    assert rebuilt["global_cl"] == expected, (
        f"{rebuilt['label']}: our overrides {rebuilt['fx']['overrides']} select loss.global_cl="
        f"'{rebuilt['global_cl']}', the official global term is '{expected}' (conf/loss/ccl.yaml terms.global_cl)"
    )


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
@pytest.mark.parametrize("term", ["cos", "dense", "global", "total"])
def test_training_losses(rebuilt: dict[str, Any], term: str) -> None:
    close(
        f"{rebuilt['label']}: {term} loss of one training step", rebuilt["losses"][term], rebuilt["fx"]["losses"][term]
    )


@slow
def test_gradient_norm(rebuilt: dict[str, Any]) -> None:
    official = rebuilt["fx"]["grad_norm"]
    close(
        f"{rebuilt['label']}: gradient norm before clipping", rebuilt["grad_norm"], official, 1e-5 * max(1.0, official)
    )


@slow
def test_official_checkpoint_import(rebuilt: dict[str, Any]) -> None:
    check_maps(
        f"{rebuilt['label']}: AD-LGC checkpoint imported with convert_official_checkpoint",
        rebuilt["ckpt_maps"],
        rebuilt["ckpt_scores"],
        rebuilt["fx"]["checkpoint"]["map"],
    )


def test_converter_refuses_a_plain_rd_checkpoint_and_unknown_keys() -> None:
    from mcad.methods.ccl_rd.official import OfficialCheckpointError

    with pytest.raises(OfficialCheckpointError, match="method=rd"):
        convert_official_checkpoint({"net": {"mff_oce.conv1.weight": torch.ones(1)}, "epoch": 1})
    with pytest.raises(OfficialCheckpointError, match="proj_layer.proj_d"):
        convert_official_checkpoint(
            {"proj_layer.proj_a.proj.0.weight": torch.ones(1), "proj_layer.proj_d.proj.0.weight": torch.ones(1)}
        )
    out = convert_official_checkpoint({"module.proj_layer.proj_c.proj.9.bias": torch.ones(2)})
    assert list(out) == ["model.proj.layers.2.proj.9.bias"]
