"""``mcad-export ckpt_path=...``: the inference path (backbone + method map [+ protocol]) as an ONNX model.

Graph input ``images``: ``(B, 3, S, S)`` float32, normalised as in training (``S`` = the run's input size,
after any crop; mean/std are stored in the model's metadata and in ``<output>.json``). Outputs:

* ``postprocess=true`` (default): ``anomaly_map`` ``(B, E, E)``, the evaluated maps, and ``score`` ``(B,)``,
  the image scores, exactly as the run's protocol computes them (upsampling to ``eval_size``, fusion with a
  segmentation map, Gaussian smoothing, max or top-k mean);
* ``postprocess=false``: the method's raw ``anomaly_map`` ``(B, 1, h, w)`` (methods that return one map
  per level, such as RD and RLR: ``anomaly_map_level0``, ``anomaly_map_level1``, ... at each level's grid,
  to be upsampled to the evaluation size and averaged) and, for methods with a segmentation head,
  ``segmentation``.

The TorchScript-based exporter is used (``torch.onnx.export(..., dynamo=False)``): it needs no extra package
and traces every method here; the batch axis is dynamic by default. After export the model is checked
with ``onnx.checker`` and, unless ``check=false``, run with onnxruntime on a random batch: the largest
absolute difference to PyTorch must stay within ``atol`` (1e-4).

Needs the ``export`` extra: ``pip install mcad[export]`` (onnx, onnxruntime).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mcad.config import config_dir
from mcad.runs import find_run_dir, load_run_config, load_trained_method
from mcad.utils.files import atomic_write_text

if TYPE_CHECKING:  # for annotations only: importing the methods' base pulls in Lightning
    from mcad.methods.base import AnomalyModule

log = logging.getLogger(__name__)


class InferencePath(nn.Module):
    """A method's inference path as a plain module: ``images -> (anomaly_map, score)`` or the raw maps."""

    def __init__(self, method: AnomalyModule, postprocess: bool = True) -> None:
        super().__init__()
        self.method = method
        self.postprocess = postprocess
        self.has_segmentation = False

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        """The outputs named in :meth:`output_names`."""
        out = self.method.anomaly_maps(images)
        if self.postprocess:
            height, width = images.shape[-2:]
            maps, scores = self.method.protocol.process(out.anomaly_map, out.segmentation, (height, width))
            return maps, scores
        levels = out.anomaly_map if isinstance(out.anomaly_map, list) else [out.anomaly_map]
        return (*levels, out.segmentation) if out.segmentation is not None else tuple(levels)

    def output_names(self, example: Tensor) -> list[str]:
        """``[anomaly_map, score]``; raw: ``anomaly_map`` (or ``anomaly_map_level<i>`` per level), ``segmentation``."""
        if self.postprocess:
            return ["anomaly_map", "score"]
        with torch.no_grad():
            out = self.method.anomaly_maps(example)
        levels = out.anomaly_map if isinstance(out.anomaly_map, list) else [out.anomaly_map]
        names = ["anomaly_map"] if len(levels) == 1 else [f"anomaly_map_level{i}" for i in range(len(levels))]
        return names + (["segmentation"] if out.segmentation is not None else [])


def export_onnx(
    method: AnomalyModule,
    input_size: int,
    path: str | Path,
    postprocess: bool = True,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    opset: int = 17,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Exports ``method``'s inference path to ``path`` (see the module docstring).

    Args:
        method: An :class:`~mcad.methods.base.AnomalyModule` with its weights.
        input_size: Side ``S`` of the square input.
        path: The ``.onnx`` file.
        postprocess: Include the protocol (evaluated maps and image scores).
        batch_size: Batch of the example input used for tracing.
        dynamic_batch: Make the batch axis dynamic.
        opset: ONNX opset.
        metadata: Entries stored as the model's ``metadata_props`` (values JSON-encoded).

    Returns:
        The written path.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = InferencePath(method.eval(), postprocess).eval()
    example = torch.randn(batch_size, 3, input_size, input_size)
    outputs = module.output_names(example)
    axes = {name: {0: "batch"} for name in ["images", *outputs]} if dynamic_batch else None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)  # the legacy exporter is deliberate
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example,), str(path), dynamo=False, input_names=["images"], output_names=outputs,
            dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
        )  # fmt: skip
    model = onnx.load(str(path))
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = str(key), json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def onnx_max_difference(method: AnomalyModule, path: str | Path, input_size: int, postprocess: bool = True,
                        batch_size: int = 3, seed: int = 0) -> float:  # fmt: skip
    """Largest absolute difference between onnxruntime and PyTorch over all outputs on a random batch."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=generator)
    module = InferencePath(method.eval(), postprocess).eval()
    with torch.no_grad():
        expected = [t.float().numpy() for t in module(images)]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy()})
    if len(got) != len(expected):
        raise AssertionError(f"ONNX model has {len(got)} outputs, PyTorch {len(expected)}.")
    diff = 0.0
    for a, b in zip(got, expected):
        if a.shape != b.shape:
            raise AssertionError(f"Output shape {a.shape} differs from PyTorch's {b.shape}.")
        diff = max(diff, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return diff


def export(cfg: DictConfig) -> dict[str, Any]:
    """Exports ``cfg.ckpt_path`` (see the module docstring); returns the sidecar record."""
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    run_dir = Path(cfg.run_dir).expanduser() if cfg.get("run_dir") else find_run_dir(ckpt)
    output = Path(cfg.output).expanduser() if cfg.get("output") else run_dir / "model.onnx"
    run_cfg = load_run_config(run_dir, output.parent, cfg.get("set"))
    method, datamodule = load_trained_method(run_cfg, ckpt)
    size = int(datamodule.input_size)
    assert datamodule.mean is not None and datamodule.std is not None  # set by load_trained_method's configure()
    metadata = {
        "input_size": size,
        "mean": list(datamodule.mean),
        "std": list(datamodule.std),
        "postprocess": bool(cfg.postprocess),
        "protocol": method.protocol.to_dict(),
        "checkpoint": str(ckpt),
        "method": type(method).__name__,
    }
    export_onnx(method, size, output, bool(cfg.postprocess), int(cfg.batch_size), bool(cfg.dynamic_batch),
                int(cfg.opset), metadata)  # fmt: skip
    record = dict(metadata, onnx=str(output))
    if cfg.get("check", True):
        batch = int(cfg.batch_size) + 1 if cfg.dynamic_batch else int(cfg.batch_size)
        diff = onnx_max_difference(method, output, size, bool(cfg.postprocess), batch)
        record["max_abs_difference"] = diff
        if diff > float(cfg.atol):
            raise AssertionError(f"ONNX output differs from PyTorch by {diff:.3g} > atol {cfg.atol}.")
        log.info("onnxruntime matches PyTorch: max |difference| %.3g <= %g.", diff, cfg.atol)
    atomic_write_text(output.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    log.info("Exported %s", output)
    print(f"Exported {output} (input (B, 3, {size}, {size}); sidecar {output.with_suffix('.json')})")
    return record


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
def main(cfg: DictConfig) -> None:
    """Console entry point ``mcad-export``."""
    OmegaConf.resolve(cfg)
    export(cfg)


if __name__ == "__main__":
    main()
