"""Dinomaly against numbers recorded from the official code (``tests/fixtures/parity/dinomaly.json``).

The fixture was written by ``experiments/parity/dinomaly.py --write-fixture`` from guojiajeremy/Dinomaly c5c76d0
with weights copied from ours. Only our side is rebuilt here (the script's own construction, no official code):
parameter counts, the test map through our ``protocol=dinomaly_gt0`` (the official evaluation's two-step
resize: input size, then 256) with our smoothing and top-1 % score, the training
loss and gradient norm in training mode with the same dropout draws at hard-mining p = 0, 0.45, 0.9, and an
official-format ``model.pth`` (rebuilt from its manifest) imported with
``mcad.methods.crr.official.convert_official_checkpoint``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
import torch
from parity_helpers import FIXTURES, close, parity_script
from test_crr_fixture import check_maps

FIXTURE = FIXTURES / "dinomaly.json"
GRAD_NORM_RTOL = 1e-5


@pytest.fixture(scope="module")
def rebuilt() -> dict[str, Any]:
    """Our side of the fixture, computed once in the script's order (eval, training, checkpoint)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dinomaly = parity_script("dinomaly")
        crr, common = sys.modules["crr"], sys.modules["common"]
        fx = json.loads(FIXTURE.read_text())
        method = common.build_method(fx["overrides"])
        seed, spec = fx["seed"], fx["input"]
        crr.prepare_ours(method, seed)
        method.eval()
        x, _, _ = crr.inputs(spec["seed"], spec["batch"], spec["size"])
        model = method.model
        out: dict[str, Any] = {"fx": fx, "common": common}
        out["params"] = {
            "bottleneck": crr.n_params(model.bottleneck.parameters()),
            "decoder (8 blocks)": crr.n_params(model.decoder.parameters()),
            "trainable": crr.n_params(model.trainable_parameters()),
        }
        # our protocol (dinomaly_gt0: via the input size, as the official evaluation) on our maps
        out["eval"] = common.evaluate_images(method, x)
        out["train"] = []
        for entry in fx["train"]:
            loss = dinomaly.our_train_loss(method, x, entry["iteration"], seed)
            out["train"].append((loss, common.grad_norm(list(model.trainable_parameters()))))
        method.zero_grad(set_to_none=True)
        files = crr.official_files(fx["checkpoint"]["manifest"], seed)
        state = crr.convert_official_checkpoint(files["model.pth"], reference=method.state_dict())
        method.load_state_dict(state, strict=True)
        out["checkpoint"] = common.evaluate_images(method, x)
        return out
    finally:
        torch.set_num_threads(threads)


def test_parameter_counts(rebuilt):
    for name, official in rebuilt["fx"]["params"].items():
        ours = rebuilt["params"][name]
        assert ours == official, f"Dinomaly parameters of the {name}: {ours} vs the official {official}"


def test_test_map_and_scores(rebuilt):
    maps, scores = rebuilt["eval"]
    check_maps("Dinomaly test map (our protocol dinomaly_gt0)", maps, scores, rebuilt["fx"]["eval"], rebuilt["common"])


def test_training_losses_and_gradient_norms(rebuilt):
    for entry, (loss, grad_norm) in zip(rebuilt["fx"]["train"], rebuilt["train"]):
        it = entry["iteration"]
        close(f"Dinomaly training loss at iteration {it}", loss, entry["loss"])
        tol = GRAD_NORM_RTOL * entry["grad_norm"]
        close(f"Dinomaly gradient norm at iteration {it}", grad_norm, entry["grad_norm"], tol)


def test_imported_official_checkpoint(rebuilt):
    maps, scores = rebuilt["checkpoint"]
    expected = rebuilt["fx"]["checkpoint"]
    check_maps("Dinomaly: imported official model.pth", maps, scores, expected, rebuilt["common"])
