"""Import of model files written by the official RLR code (``hlr7999/RLR`` @ 06e597b).

What the official code saves (``trainer.py::train``, lines 209-228): after every epoch's test, the dict

.. code-block:: python

    {"state_dict": [model.state_dict() for model in self.models],  # one models/model.py::RLR per level
     "epoch": int, "best_img_auc": float, "best_pix_auc": float,
     "best_img_aucs": list[float], "best_pix_aucs": list[float]}

goes to ``save/<prefix>/latest.pth`` (every epoch), ``best-img.pth`` (when the mean test image AUROC
improved; the file ``--mode test`` loads, ``trainer.py::test`` lines 234-238) and ``best-pix.pth`` (pixel
AUROC improved). On a real run the AUROC entries are numpy floats.

One level's state dict (README command: ``--blocks mca nsa --blocks_gate none --layers 4``) holds 73
tensors, which map one to one onto :class:`~mcad.methods.rlr.components.decoder.RLRLevelModel` (official -> ours):

* ``ref_mca`` ``(1, L, C)`` -> ``reference``;
* ``embedding.project_embedding.project.weight`` ``(d, C, 1)`` -> ``embedding.proj.weight`` ``(d, C)`` (a
  kernel-1 ``Conv1d`` is a ``Linear``: the last axis is squeezed), ``.bias`` -> ``embedding.proj.bias``;
* ``ref_mca_embedding.project_embedding.project.*`` -> ``reference_embedding.proj.*`` (the same);
* ``encoder.encode_layers.<j>.mca.*`` -> ``layers.<j>.lca.attn.*`` (LCA) and ``.nsa.*`` ->
  ``layers.<j>.mlka.attn.*`` (MLKA);
* ``encoder.encode_layers.<j>.{norm1, ffn.fc1, ffn.fc2, norm2}.*`` -> ``layers.<j>.{...}.*``;
* ``encoder.norm.*`` -> ``norm.*``; ``projection.*`` -> ``projection.*``.

The attention tensors (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``)
keep their names: :class:`~mcad.methods.rlr.components.attention.MultiHeadAttention` lays its parameters out
like ``nn.MultiheadAttention``. Not in the file, so not converted: the frozen backbone (the official code
loads timm's ImageNet weights, ``trainer.py::build_model``; ours comes from the ``backbone`` config), the
sinusoidal position tables (a plain attribute there, a non-persistent buffer here) and the window masks
(rebuilt from the grid on both sides). Official variants that were not ported (``ca``/``msa``/``sa``
blocks, learnable ``gate``/``net`` gates, ``serial`` mode) are refused with the offending keys named.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mcad.utils.checkpoints import load_checkpoint

__all__ = [
    "DECODER_PREFIX",
    "convert_level_state_dict",
    "convert_official_checkpoint",
    "load_official_checkpoint",
    "read_official_checkpoint",
]

#: Where the decoder sits in :class:`~mcad.methods.rlr.module.RLRModule`'s state dict.
DECODER_PREFIX = "model.decoder."

_EMBEDDING = re.compile(r"^(embedding|ref_mca_embedding)\.project_embedding\.project\.(weight|bias)$")
_LAYER = re.compile(r"^encoder\.encode_layers\.(\d+)\.(.+)$")
_ATTENTION_LEAVES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
_LAYER_PLAIN = {f"{m}.{p}" for m in ("norm1", "norm2", "ffn.fc1", "ffn.fc2") for p in ("weight", "bias")}
_BRANCHES = {"mca": "lca.attn", "nsa": "mlka.attn"}
_NOT_PORTED = {
    "ca": "the 'ca' block (--blocks ca)",
    "msa": "the 'msa' block (--blocks msa)",
    "sa": "the 'sa' block (--blocks sa)",
    "norm0": "the serial block mode (--block_mode serial)",
}
_TOP_LEVEL = {"ref_mca": "reference", "encoder.norm.weight": "norm.weight", "encoder.norm.bias": "norm.bias",
              "projection.weight": "projection.weight", "projection.bias": "projection.bias"}  # fmt: skip


def _rename(key: str, value: Tensor) -> tuple[str, Tensor] | str:
    """Our name and tensor for one official key, or the reason it cannot be converted."""
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key], value
    match = _EMBEDDING.match(key)
    if match:
        ours = "embedding" if match.group(1) == "embedding" else "reference_embedding"
        if match.group(2) == "weight":
            if value.dim() != 3 or value.shape[-1] != 1:
                return f"expected a kernel-1 Conv1d weight (d, C, 1), got {tuple(value.shape)}"
            value = value.squeeze(-1)
        return f"{ours}.proj.{match.group(2)}", value
    match = _LAYER.match(key)
    if match:
        index, rest = match.groups()
        block = rest.split(".", 1)[0]
        if block in _BRANCHES and rest.split(".", 1)[-1] in _ATTENTION_LEAVES:
            return f"layers.{index}.{_BRANCHES[block]}.{rest.split('.', 1)[1]}", value
        if rest in _LAYER_PLAIN:
            return f"layers.{index}.{rest}", value
        if block in _NOT_PORTED:
            return f"{_NOT_PORTED[block]} is not ported"
    if key == "encoder.gate" or key.startswith("encoder.gate."):
        return "learnable branch gates (--blocks_gate gate|net) are not ported"
    return "unknown key"


def convert_level_state_dict(official: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Converts one official level's state dict (``models/model.py::RLR``) to :class:`RLRLevelModel` keys.

    Args:
        official: The level's state dict as saved (``state["state_dict"][i]``).

    Returns:
        ``{our key: tensor}`` without prefix; the ``Conv1d`` embedding weights squeezed to ``(d, C)``.

    Raises:
        ValueError: Keys that have no counterpart (named with the reason), or an incomplete level:
            missing keys of the reference, embeddings, final norm and projection, or of any layer.
    """
    converted: dict[str, Tensor] = {}
    problems = []
    for key, value in official.items():
        result = _rename(key, value)
        if isinstance(result, str):
            problems.append(f"{key} {tuple(value.shape)}: {result}")
        else:
            converted[result[0]] = result[1]
    if problems:
        raise ValueError("Cannot convert these official RLR keys:\n  " + "\n  ".join(problems))
    required = {"reference", "norm.weight", "norm.bias", "projection.weight", "projection.bias"}
    required |= {f"{e}.proj.{p}" for e in ("embedding", "reference_embedding") for p in ("weight", "bias")}
    layers = sorted({int(k.split(".")[1]) for k in converted if k.startswith("layers.")})
    branches = sorted(
        {k.split(".")[2] for k in converted if k.startswith("layers.") and k.split(".")[2] in ("lca", "mlka")}
    )
    if not branches:
        raise ValueError("The official level has neither an 'mca' (LCA) nor an 'nsa' (MLKA) block.")
    for j in range(max(layers, default=-1) + 1):
        required |= {f"layers.{j}.{name}" for name in _LAYER_PLAIN}
        required |= {f"layers.{j}.{b}.attn.{leaf}" for b in branches for leaf in _ATTENTION_LEAVES}
    missing = sorted(required - set(converted))
    if missing:
        raise ValueError(f"The official level state dict is incomplete; missing (our names): {missing}")
    return converted


def _level_dicts(official: Any) -> list[Mapping[str, Tensor]]:
    if isinstance(official, Mapping) and "state_dict" in official:
        official = official["state_dict"]
    is_list = isinstance(official, Sequence) and not isinstance(official, (str, bytes))
    if is_list and len(official) > 0 and all(isinstance(level, Mapping) for level in official):
        return list(official)
    raise ValueError(
        "Expected the official RLR file (a dict whose 'state_dict' entry is a list with one state dict per "
        f"level, trainer.py:209-228) or that list itself; got {type(official).__name__}"
        + (f" with keys {sorted(official)[:10]}" if isinstance(official, Mapping) else "")
    )


def _describe(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def convert_official_checkpoint(
    official: Mapping[str, Any] | Sequence[Mapping[str, Tensor]],
    target: Mapping[str, Tensor] | None = None,
    prefix: str = DECODER_PREFIX,
) -> dict[str, Tensor]:
    """Converts an official RLR model file into a state dict of our RLR method's decoder.

    Args:
        official: What ``torch.load`` returns for ``latest.pth`` / ``best-img.pth`` / ``best-pix.pth``
            (see the module docstring), or its ``"state_dict"`` list (one state dict per level, finest
            level first, the order of ``--out_indices``).
        target: Optional state dict of the method that will load the result (``method.state_dict()``);
            when given, the converted decoder keys must be exactly the target's keys under ``prefix``,
            with the same shapes.
        prefix: Prefix of the decoder in the target (``model.decoder.`` for ``RLRModule``; ``""`` for a
            bare :class:`~mcad.methods.rlr.components.decoder.RLRDecoder`).

    Returns:
        ``{prefix + "levels.<i>." + key: tensor}`` for every level. Backbone keys are absent (the official
        file does not hold the backbone): load with ``strict=False``, or use :func:`load_official_checkpoint`,
        which checks that only backbone keys were left out.

    Raises:
        ValueError: The structure is not an official RLR file; a key has no counterpart (named, with the
            reason: e.g. a variant that was not ported); a level is incomplete; or, with ``target``, the
            missing / unexpected keys and the shape mismatches against the target, all named.
    """
    levels = _level_dicts(official)
    converted: dict[str, Tensor] = {}
    for index, level in enumerate(levels):
        try:
            ours = convert_level_state_dict(level)
        except ValueError as error:
            raise ValueError(f"Official RLR level {index}: {error}") from None
        converted.update({f"{prefix}levels.{index}.{key}": value for key, value in ours.items()})
    if target is not None:
        expected = {k: v for k, v in target.items() if k.startswith(prefix + "levels.")}
        missing = sorted(set(expected) - set(converted))
        unexpected = sorted(set(converted) - set(expected))
        shapes = [
            f"{k}: file {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in sorted(set(converted) & set(expected))
            if tuple(converted[k].shape) != tuple(expected[k].shape)
        ]
        if missing or unexpected or shapes:
            lines = [f"The official RLR file ({len(levels)} levels) does not fit the model:"]
            if missing:
                lines.append(f"  missing in the file ({len(missing)}): {_describe(missing)}")
            if unexpected:
                lines.append(f"  not in the model ({len(unexpected)}): {_describe(unexpected)}")
            if shapes:
                lines.append(f"  shape mismatches ({len(shapes)}):\n    " + "\n    ".join(shapes[:12]))
            lines.append(
                "  (levels, layers and widths come from the config: backbone.out_indices, decoder.num_layers, "
                "decoder.hidden_dims / hidden_base, data.image_size; the official --ref_len > 1 is not ported)"
            )
            raise ValueError("\n".join(lines))
    return converted


def read_official_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads an official RLR file on the CPU without executing pickled code.

    The file holds tensors, an int and (after a real run) numpy floats, which the project's one checkpoint
    loader (:func:`mcad.utils.checkpoints.load_checkpoint`) accepts as plain data.

    Args:
        path: ``latest.pth``, ``best-img.pth`` or ``best-pix.pth``.

    Returns:
        The saved dict.
    """
    return load_checkpoint(path)


def load_official_checkpoint(method: nn.Module, official: Any, prefix: str = DECODER_PREFIX) -> list[str]:
    """Loads an official RLR file (as returned by :func:`read_official_checkpoint`) into our method.

    Args:
        method: An :class:`~mcad.methods.rlr.module.RLRModule` built with the same recipe (levels, layers,
            widths, image size) as the official run.
        official: The official file's content, or its ``"state_dict"`` list.
        prefix: Where the decoder sits in ``method.state_dict()``.

    Returns:
        The keys that kept the method's own values: the frozen backbone (from the ``backbone`` config).

    Raises:
        ValueError: As :func:`convert_official_checkpoint`, or if a key outside the backbone was not
            filled.
    """
    converted = convert_official_checkpoint(official, target=method.state_dict(), prefix=prefix)
    result = method.load_state_dict(converted, strict=False)
    not_backbone = [k for k in result.missing_keys if ".backbone." not in f".{k}"]
    if not_backbone or result.unexpected_keys:
        raise ValueError(
            f"Loading the converted RLR file left keys unset: {_describe(not_backbone)}; "
            f"unexpected: {_describe(result.unexpected_keys)}"
        )
    return list(result.missing_keys)
