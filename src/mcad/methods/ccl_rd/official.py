"""Import of official CCL-on-RD checkpoints (LGC-AD/AD-LGC, both code versions) into ``method=ccl_rd``.

File format: AD-LGC is built on ADer and saves with ADer's ``BaseTrainer.save_checkpoint``
(``trainer/_base_trainer.py:232-246`` at HEAD 6502f68, the same function at v1 204b215):

* ``ckpt.pth``: ``{'net': trans_state_dict(net.state_dict(), dist=False), 'optimizer', 'scheduler', 'scaler',
  'iter', 'epoch', 'metric_recorder', 'total_time'}`` (``trans_state_dict`` removes a DDP ``module.`` prefix);
* ``net.pth`` and ``net_<epoch>.pth``: the ``net`` state dict alone.

The official loader takes either (``model/__init__.py::get_model``: ``ckpt['net']`` if present, else the file,
``load_state_dict(strict=True)``). The CCL paper's released "LGC with RD" checkpoint (the Google Drive / Baidu link
of both readmes) is one of these files. ``net`` is ``model/lgc.py::LGC`` (v1) or ``model/rd.py::RDLGC`` (HEAD);
both hold the same keys:

=========================================  ================================================
official (``net``)                         ours (``method=ccl_rd`` state dict)
=========================================  ================================================
``net_t.<k>`` (timm WRN50-2, stages 1-3)   ``model.rd.teacher.model.<k>`` (the file holds the teacher)
``mff_oce.bn_layer.<k>``                   ``model.rd.ocbe.embed.<k>``
``mff_oce.<k>``                            ``model.rd.ocbe.<k>``
``net_s.layer<i>.<k>``                     ``model.rd.decoder.stages.<i-1>.<k>``
``proj_layer.proj_a|b|c.proj.<n>.<k>``     ``model.proj.layers.0|1|2.proj.<n>.<k>``
=========================================  ================================================

HEAD's depthwise-separable projection (``dp=True``) has the same key layout; load it with
``method.separable_projection=true``. A plain RD checkpoint (no ``proj_layer``) belongs to ``method=rd``
(:mod:`mcad.methods.rd.official`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from mcad.methods.rd.official import OfficialCheckpointError, ader_key, check_against_reference, unwrap_net

__all__ = ["OfficialCheckpointError", "ccl_key", "convert_official_checkpoint"]

_PROJ = {"proj_a": 0, "proj_b": 1, "proj_c": 2}


def ccl_key(key: str) -> str | None:
    """Our ``method=ccl_rd`` key for a key of AD-LGC's ``LGC`` / ``RDLGC`` state dict; ``None`` if unknown."""
    if key.startswith("proj_layer."):
        level, _, rest = key[len("proj_layer.") :].partition(".")
        if level not in _PROJ or not rest:
            return None
        return f"model.proj.layers.{_PROJ[level]}.{rest}"
    return ader_key(key, prefix="model.rd.")


def convert_official_checkpoint(
    official: Mapping[str, Any], reference: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Turns an AD-LGC checkpoint (``ckpt.pth`` or ``net.pth``, as loaded by ``torch.load``) into our state dict.

    Args:
        official: The loaded file; its ``'net'`` entry is used if present (optimiser state etc. ignored).
        reference: ``method.state_dict()`` of the target ``method=ccl_rd``; when given, every key and shape is
            checked against it, so that ``method.load_state_dict(result)`` (strict) succeeds.

    Returns:
        Our key -> tensor (cloned, contiguous), teacher included (the official file holds it).

    Raises:
        OfficialCheckpointError: Not a dict, not a CCL checkpoint (no ``proj_layer``: a plain RD file), keys of no
            known module, or (with ``reference``) missing / unexpected keys and shape mismatches, each named.
    """
    if not isinstance(official, Mapping):
        raise OfficialCheckpointError(f"expected a dict loaded from an AD-LGC checkpoint, got {type(official)}")
    net = unwrap_net(official)
    if not any(str(k).startswith("proj_layer.") for k in net):
        hint = (
            " It looks like an RD checkpoint: use method=rd (mcad.methods.rd.official)."
            if any(str(k).startswith("mff_oce.") for k in net)
            else ""
        )
        sample = sorted(str(k) for k in net)[:8]
        raise OfficialCheckpointError(f"No 'proj_layer.*' keys: not an AD-LGC CCL checkpoint (keys {sample}).{hint}")
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in net.items():
        ours = ccl_key(key)
        if ours is None or not isinstance(value, Tensor):
            unknown.append(key)
            continue
        out[ours] = value.detach().clone().contiguous()
    if unknown:
        raise OfficialCheckpointError(f"{len(unknown)} keys of no CCL-on-RD module (or not tensors): {unknown[:10]}")
    if reference is None:
        return out
    hint = "check method.separable_projection (HEAD dp=True files) and method.ocbe.base_width (64)"
    return check_against_reference(out, reference, hint=hint)
