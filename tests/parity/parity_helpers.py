"""What the parity fixture tests share: the parity scripts loaded by path, and tolerance checks that name
the method and the quantity in their failure message.

The scripts in ``experiments/parity/`` are not a package; their our-side helpers (``common.map_stats`` ...)
import no official code, so the tests load them by file path.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "parity"
TOL = 1e-5  # float32 forward outputs, losses and maps


def parity_script(name: str) -> Any:
    """``experiments/parity/<name>.py``, loaded once by path."""
    module_name = f"mcad_parity_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "experiments" / "parity" / f"{name}.py")
        assert spec is not None and spec.loader is not None, f"experiments/parity/{name}.py not found"
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def close(what: str, ours: Any, official: Any, tol: float = TOL) -> None:
    """Asserts ``max |ours - official| <= tol``; ``what`` names the method and the quantity."""
    a = torch.as_tensor(ours, dtype=torch.float64)
    b = torch.as_tensor(official, dtype=torch.float64)
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs the official {tuple(b.shape)}"
    diff = float((a - b).abs().max())
    head = f"ours {a.flatten()[:3].tolist()}, official {b.flatten()[:3].tolist()}"
    assert diff <= tol, f"{what}: max |ours - official| = {diff:.3e} > {tol:.0e} ({head})"


def map_differences(maps: torch.Tensor, scores: torch.Tensor, expected: dict[str, Any]) -> dict[str, float]:
    """Largest |ours - official| of each per-image map statistic, the 16x16 pooled maps and the image scores."""
    common = parity_script("common")
    diffs: dict[str, float] = {}
    for i, m in enumerate(maps):
        stats = common.map_stats(m)
        for key in ("mean", "std", "min", "max"):
            diffs[f"map {key}"] = max(diffs.get(f"map {key}", 0.0), abs(stats[key] - expected["stats"][i][key]))
        pooled = torch.tensor(common.pooled_map(m), dtype=torch.float64)
        diff = float((pooled - torch.tensor(expected["pooled"][i], dtype=torch.float64)).abs().max())
        diffs["16x16 pooled map"] = max(diffs.get("16x16 pooled map", 0.0), diff)
    diffs["image scores"] = float((scores.double() - torch.tensor(expected["scores"], dtype=torch.float64)).abs().max())
    return diffs


def check_maps(what: str, maps: torch.Tensor, scores: torch.Tensor, expected: dict[str, Any]) -> None:
    """Map statistics, pooled maps and image scores against the fixture; every excess is listed in one message."""
    bad = {k: v for k, v in map_differences(maps, scores, expected).items() if not v <= TOL}
    listed = ", ".join(f"{k} {v:.2e}" for k, v in bad.items())
    value_range = max(s["max"] - s["min"] for s in expected["stats"])
    assert not bad, f"{what}: max |ours - official| above {TOL:.0e}: {listed} (official map range {value_range:.3g})"


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
