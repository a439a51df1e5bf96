"""Import of official Reverse Distillation checkpoints (RD4AD and ADer) into ``method=rd``.

Two file formats exist:

* **RD4AD** (hq-deng/RD4AD 6554076, ``main.py:112-113``): ``torch.save({'bn': bn.state_dict(), 'decoder':
  decoder.state_dict()}, ckp_path)``. ``bn`` is ``resnet.py::BN_layer`` (OCBE, base width 128, plus the
  unused ``conv4``/``bn4``), ``decoder`` is ``de_resnet.py::de_wide_resnet50_2``. The teacher is not saved:
  RD4AD always builds it from torchvision's ImageNet weights (``resnet.py:252-267``), i.e. our
  ``backbone.model_name=wide_resnet50_2.tv_in1k``. Load it into ``experiment=rd_mvtec
  method.ocbe.base_width=128 backbone.model_name=wide_resnet50_2.tv_in1k``.
* **ADer** (zhangzjn/ADer 902937a, ``trainer/_base_trainer.py:232-246``): ``ckpt.pth`` is the trainer
  checkpoint ``{'net': net.state_dict() (without a DDP ``module.`` prefix), 'optimizer', 'scheduler', 'scaler',
  'iter', 'epoch', 'metric_recorder', 'total_time'}``; ``net.pth`` / ``net_<epoch>.pth`` hold the ``net``
  state dict alone. ``net`` is ``model/rd.py::RD``: ``net_t`` (timm ``wide_resnet50_2`` features_only, stages
  1-3, the teacher, included in the file), ``mff_oce`` (OCBE, base width 64), ``net_s`` (the decoder). Load it
  into ``experiment=rd_mvtec``. The official loader accepts both (``model/__init__.py::get_model``: ``ckpt['net']``
  if present, else the file itself); so does :func:`convert_official_checkpoint`.

Key correspondence (our keys under ``prefix``, ``model.`` for ``method=rd``):

=====================================  ===============================================
official                               ours
=====================================  ===============================================
``net_t.<k>`` (ADer)                   ``teacher.model.<k>``
``mff_oce.bn_layer.<k>`` / ``bn_layer.<k>``  ``ocbe.embed.<k>``
``mff_oce.<k>`` / ``bn.<k>``           ``ocbe.<k>`` (``conv1-3``, ``bn1-3``)
``net_s.layer<i>.<k>`` / ``layer<i>``  ``decoder.stages.<i-1>.<k>`` (``layer1`` = deepest)
``conv4``, ``bn4`` (RD4AD)             dropped: built but never used by ``BN_layer.forward``
``*memory*`` (RD4AD)                   dropped, as RD4AD's ``test.py:125-127`` does
=====================================  ===============================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor

__all__ = [
    "OfficialCheckpointError",
    "ader_key",
    "check_against_reference",
    "convert_official_checkpoint",
    "detect_format",
    "rd4ad_key",
    "unwrap_net",
]

Format = Literal["auto", "ader", "rd4ad"]

_LAYER = re.compile(r"^layer([123])\.(.*)$")
# RD4AD builds these in BN_layer.__init__ but BN_layer._forward_impl never calls them (resnet.py:412-413, 446-455).
_RD4AD_UNUSED = ("conv4.", "bn4.")


class OfficialCheckpointError(ValueError):
    """An official checkpoint that does not fit the method: unknown format, missing or unexpected keys, shapes."""


def _decoder_key(key: str) -> str:
    match = _LAYER.match(key)
    if match is None:
        raise KeyError(key)
    return f"decoder.stages.{int(match.group(1)) - 1}.{match.group(2)}"


def _ocbe_key(key: str) -> str:
    if key.startswith("bn_layer."):
        return "ocbe.embed." + key[len("bn_layer.") :]
    return "ocbe." + key


def ader_key(key: str, prefix: str = "model.") -> str | None:
    """Our key for a key of ADer's ``RD`` state dict (``net_t.*``, ``mff_oce.*``, ``net_s.*``).

    Returns:
        The key under ``prefix``, or ``None`` for a key outside these three modules.
    """
    if key.startswith("net_t."):
        return f"{prefix}teacher.model.{key[len('net_t.') :]}"
    if key.startswith("mff_oce."):
        return prefix + _ocbe_key(key[len("mff_oce.") :])
    if key.startswith("net_s."):
        try:
            return prefix + _decoder_key(key[len("net_s.") :])
        except KeyError:
            return None
    return None


def rd4ad_key(group: str, key: str, prefix: str = "model.") -> str | None:
    """Our key for ``key`` of the ``bn`` or ``decoder`` entry of an RD4AD checkpoint.

    Returns:
        The key under ``prefix``; ``None`` for the keys RD4AD itself never uses (``conv4``/``bn4``,
        ``memory``); raises ``KeyError`` for a key of no known module.
    """
    if group == "bn":
        if key.startswith(_RD4AD_UNUSED) or "memory" in key:
            return None
        return prefix + _ocbe_key(key)
    if group == "decoder":
        return prefix + _decoder_key(key)
    raise KeyError(f"{group}.{key}")


def detect_format(official: Mapping[str, Any]) -> Literal["ader", "rd4ad"]:
    """``rd4ad`` for a ``{'bn', 'decoder'}`` file, ``ader`` for a trainer checkpoint or a bare ``net`` state dict.

    Raises:
        OfficialCheckpointError: The object is neither.
    """
    if not isinstance(official, Mapping):
        raise OfficialCheckpointError(f"expected a dict loaded from an official checkpoint, got {type(official)}")
    keys = set(official)
    if {"bn", "decoder"} <= keys and all(isinstance(official[k], Mapping) for k in ("bn", "decoder")):
        return "rd4ad"
    net = unwrap_net(official)
    if any(str(k).startswith(("net_t.", "mff_oce.", "net_s.")) for k in net):
        return "ader"
    sample = sorted(str(k) for k in keys)[:8]
    raise OfficialCheckpointError(
        "Not an official RD checkpoint: expected RD4AD's {'bn': ..., 'decoder': ...} (main.py) or ADer's trainer "
        "checkpoint {'net': {'net_t.*', 'mff_oce.*', 'net_s.*'}, ...} (or its 'net' alone); "
        f"top-level keys: {sample}"
    )


def unwrap_net(official: Mapping[str, Any]) -> Mapping[str, Any]:
    """The network state dict of an ADer-style file: ``official['net']`` if present, else the file itself.

    A ``module.`` prefix (a DDP model saved without ``trans_state_dict``) is removed.
    """
    net = official["net"] if "net" in official and isinstance(official["net"], Mapping) else official
    return {(k[len("module.") :] if str(k).startswith("module.") else k): v for k, v in net.items()}


def _tensors(items: Mapping[str, Any], where: str) -> None:
    bad = [k for k, v in items.items() if not isinstance(v, Tensor)]
    if bad:
        raise OfficialCheckpointError(f"{where}: entries that are not tensors: {bad[:8]}")


_RD_HINT = "check method.ocbe.base_width (128 for RD4AD files, 64 for ADer / AD-LGC) and the backbone"


def check_against_reference(
    converted: dict[str, Tensor],
    reference: Mapping[str, Tensor],
    fill_prefixes: tuple[str, ...] = (),
    hint: str = _RD_HINT,
) -> dict[str, Tensor]:
    """Checks a converted state dict against the method's own and completes it from there.

    Args:
        converted: Our keys -> tensors from the official file.
        reference: ``method.state_dict()`` of the method to load into.
        fill_prefixes: Key prefixes that may be absent from the file (the frozen teacher of an RD4AD file);
            those keys are taken from ``reference``.
        hint: What to check, appended to the error message.

    Returns:
        A state dict that ``method.load_state_dict(..., strict=True)`` accepts.

    Raises:
        OfficialCheckpointError: Keys the method does not have, keys it needs that the file lacks, or shapes that
            differ, each listed.
    """
    unexpected = sorted(set(converted) - set(reference))
    missing = sorted(k for k in set(reference) - set(converted) if not k.startswith(fill_prefixes))
    shapes = [
        f"{k}: file {tuple(v.shape)} vs method {tuple(reference[k].shape)}"
        for k, v in converted.items()
        if k in reference and tuple(v.shape) != tuple(reference[k].shape)
    ]
    if unexpected or missing or shapes:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} keys the method does not have: {unexpected[:10]}")
        if missing:
            parts.append(f"{len(missing)} keys the file lacks: {missing[:10]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches: {shapes[:10]}")
        raise OfficialCheckpointError(f"The official checkpoint does not fit this method ({hint}): " + "; ".join(parts))
    out = dict(converted)
    for key in reference:
        if key not in out:
            out[key] = reference[key]
    return out


def convert_official_checkpoint(
    official: Mapping[str, Any],
    reference: Mapping[str, Tensor] | None = None,
    fmt: Format = "auto",
    prefix: str = "model.",
) -> dict[str, Tensor]:
    """Turns an official RD checkpoint (RD4AD or ADer, as loaded by ``torch.load``) into our state dict.

    Args:
        official: The loaded file: RD4AD's ``{'bn', 'decoder'}``, ADer's trainer checkpoint (``'net'`` entry used,
            the optimiser state ignored) or ADer's bare ``net`` state dict.
        reference: ``method.state_dict()`` of the target method. When given, the result is checked against it
            (every key and shape) and completed with its teacher weights where the file holds none (RD4AD), so
            that ``method.load_state_dict(result)`` (strict) succeeds. Without it the result holds only the keys
            found in the file, and an RD4AD result lacks the teacher (load with ``strict=False``).
        fmt: ``auto`` (detect), ``ader`` or ``rd4ad``.
        prefix: Prefix of the RD modules in our state dict (``model.`` for ``method=rd``; ``model.rd.`` for CCL).

    Returns:
        Our key -> tensor (cloned, contiguous).

    Raises:
        OfficialCheckpointError: Unknown format, keys of no known module, or (with ``reference``) missing /
            unexpected keys and shape mismatches, each named.
    """
    kind = detect_format(official) if fmt == "auto" else fmt
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    if kind == "rd4ad":
        for group in ("bn", "decoder"):
            if group not in official:
                raise OfficialCheckpointError(f"RD4AD checkpoint without its '{group}' entry")
            _tensors(official[group], group)
            for key, value in official[group].items():
                try:
                    ours = rd4ad_key(group, key, prefix)
                except KeyError:
                    unknown.append(f"{group}.{key}")
                    continue
                if ours is not None:
                    out[ours] = value.detach().clone().contiguous()
    elif kind == "ader":
        net = unwrap_net(official)
        _tensors(net, "net")
        for key, value in net.items():
            ours = ader_key(key, prefix)
            if ours is None:
                unknown.append(key)
                continue
            out[ours] = value.detach().clone().contiguous()
    else:
        raise OfficialCheckpointError(f"unknown checkpoint format {fmt!r} (auto, ader, rd4ad)")
    if unknown:
        raise OfficialCheckpointError(f"{len(unknown)} keys of no RD module in the {kind} checkpoint: {unknown[:10]}")
    if reference is None:
        return out
    return check_against_reference(out, reference, fill_prefixes=(f"{prefix}teacher.",) if kind == "rd4ad" else ())
