"""``mcad-import``: a checkpoint released by a method's official code, as an mcad run folder.

::

    mcad-import --official rd4ad_bottle.pth --output runs/rd4ad -- experiment=rd_mvtec method.ocbe.base_width=128
    mcad-import --official ckpt.pth --output runs/ccl -- experiment=ccl_rd_mvtec            # AD-LGC (CCL) file
    mcad-import --official latest.pth --output runs/rlr -- experiment=rlr_mvtec             # RLR's saved model
    mcad-import --official model.pth --seg-model Seg_model_7999.pth --output runs/crr -- experiment=crr_realiad
    mcad-eval ckpt_path=runs/rd4ad/checkpoints/last.ckpt +set.data.root=/data/mvtec         # then evaluate it

The arguments after ``--`` compose the run config exactly as ``python train.py`` would (the recipe the
official file was trained with: method, backbone, decoder sizes, image size). The method's own converter
(``src/mcad/methods/<name>/official.py``) maps the official keys onto ours and checks every key and shape
against the built method, naming what does not fit. Weights the official file does not hold (RD4AD's and
RLR's frozen backbone) come from the ``backbone`` config (timm's pretrained weights or
``backbone.weights_path``) and are listed in ``import.json``.

Output: ``<output>/checkpoints/last.ckpt`` (``state_dict`` of the whole method), ``<output>/.hydra/config.yaml``
(the composed config, so that ``mcad-eval`` / ``mcad-predict`` / ``mcad-export`` find the run) and
``<output>/import.json`` (source file, its SHA-256, which keys came from it). Nothing is written when the
file does not fit the method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from mcad.build import build_components
from mcad.config import config_dir, refuse_secrets, validate_config
from mcad.utils.checkpoints import load_checkpoint
from mcad.utils.files import atomic_write, atomic_write_text

__all__ = ["CONVERTERS", "import_official", "main"]

#: ``convert(official, seg_model, reference) -> {our key: tensor}`` per ``method_name``.
Converter = Callable[[Mapping[str, Any], Mapping[str, Any] | None, Mapping[str, Tensor]], dict[str, Tensor]]


def _rd(official: Mapping[str, Any], seg: Mapping[str, Any] | None, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from mcad.methods.rd.official import convert_official_checkpoint

    return convert_official_checkpoint(official, reference=ref)


def _ccl_rd(official: Mapping[str, Any], seg: Mapping[str, Any] | None, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from mcad.methods.ccl_rd.official import convert_official_checkpoint

    return convert_official_checkpoint(official, reference=ref)


def _rlr(official: Mapping[str, Any], seg: Mapping[str, Any] | None, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from mcad.methods.rlr.official import convert_official_checkpoint

    return convert_official_checkpoint(official, target=ref)


def _crr(official: Mapping[str, Any], seg: Mapping[str, Any] | None, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
    from mcad.methods.crr.official import convert_official_checkpoint

    return convert_official_checkpoint(official, seg, reference=ref)


CONVERTERS: dict[str, Converter] = {"rd": _rd, "ccl_rd": _ccl_rd, "rlr": _rlr, "crr": _crr, "dinomaly": _crr}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_official(
    cfg: DictConfig, official_path: str | Path, output: str | Path, seg_model_path: str | Path | None = None
) -> Path:
    """Converts an official checkpoint for the method of ``cfg`` and writes an mcad run folder.

    Args:
        cfg: The composed training config of the recipe the file was trained with.
        official_path: The official checkpoint.
        output: The run folder to write.
        seg_model_path: CRR's stage-II segmentation file, if any.

    Returns:
        The written checkpoint.

    Raises:
        KeyError: The method has no converter.
        ValueError: The file does not fit the method (the converter names the keys / shapes).
        CheckpointError: A file does not load as plain data.
    """
    name = str(cfg.get("method_name"))
    if name not in CONVERTERS:
        raise KeyError(f"No official-checkpoint converter for method '{name}' (known: {', '.join(CONVERTERS)}).")
    official_path = Path(official_path).expanduser()
    official = load_checkpoint(official_path)
    seg_model = load_checkpoint(Path(seg_model_path).expanduser()) if seg_model_path else None
    method, _ = build_components(cfg)
    reference = method.state_dict()
    converted = CONVERTERS[name](official, seg_model, reference)
    unexpected = sorted(set(converted) - set(reference))
    if unexpected:
        raise ValueError(f"The converter produced keys the method does not have: {unexpected[:8]}")
    kept = sorted(set(reference) - set(converted))
    not_backbone = [k for k in kept if ".backbone." not in f".{k}" and ".teacher." not in f".{k}"]
    if not_backbone:
        raise ValueError(f"{official_path} leaves trained weights of {name} unset: {not_backbone[:8]}")
    method.load_state_dict({**reference, **converted}, strict=True)

    output = Path(output).expanduser()
    ckpt = output / "checkpoints" / "last.ckpt"
    record = {
        "method": name,
        "official": str(official_path),
        "official_sha256": _sha256(official_path),
        "seg_model": str(seg_model_path) if seg_model_path else None,
        "keys_from_file": len(converted),
        "keys_from_backbone_config": kept,
    }
    state = {"state_dict": method.state_dict(), "mcad_import": record}
    atomic_write(ckpt, lambda fh: torch.save(state, fh), binary=True)
    saved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(saved):
        saved.paths.output_dir = str(output)
    atomic_write_text(output / ".hydra" / "config.yaml", OmegaConf.to_yaml(saved))
    atomic_write_text(output / "import.json", json.dumps(record, indent=2) + "\n")
    return ckpt


def _compose(overrides: Sequence[str], output: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output)
        if OmegaConf.select(cfg, "paths.root_dir", throw_on_resolution_failure=False) is None:
            cfg.paths.root_dir = str(Path.cwd())
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``mcad-import``."""
    parser = argparse.ArgumentParser(prog="mcad-import", description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="the checkpoint written by the method's official code")
    parser.add_argument("--seg-model", default=None, help="CRR: the stage-II segmentation file (Seg_model_*.pth)")
    parser.add_argument("--output", required=True, help="the run folder to write")
    parser.add_argument("overrides", nargs="*", help="config overrides after '--', as for train.py")
    args = parser.parse_args(argv)
    output = Path(args.output)
    cfg = _compose(args.overrides, output)
    validate_config(cfg)
    refuse_secrets(cfg)
    ckpt = import_official(cfg, args.official, output, args.seg_model)
    print(f"Wrote {ckpt}; evaluate with: mcad-eval ckpt_path={ckpt} +set.data.root=<dataset root>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
