"""Import of the released CRR and Dinomaly checkpoints into our ``CRRModule`` state dict.

The official scripts save plain ``state_dict()`` files (Qiqigeww/CRR-MUAD @ cbd2a12, guojiajeremy/Dinomaly
@ c5c76d0):

* **CRR stage I** ``model.pth``: ``torch.save(model.state_dict(), ... 'model.pth')``
  (``dinomaly_realiad_uni_first.py:185`` every 50 000 it and ``:222`` at the end; loaded by
  ``dinomaly_realiad_uni_second.py:148`` and ``dinomaly_realiad_uni_test.py:103``). ``model`` is
  ``ViTill`` (``models/uad.py``), so the keys are

  - ``encoder.*``: the whole DINOv2 ViT-B/14 reg4 exactly as in ``dinov2_vitb14_reg4_pretrain.pth``
    (``models/vit_encoder.py:38-48`` builds it at 518 px and loads that file): ``cls_token``, ``pos_embed``
    ``(1, 1 + 37 * 37, 768)``, ``register_tokens``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.0-11.*``
    (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``),
    ``norm.*``;
  - ``bottleneck.0.fc1.*``, ``bottleneck.0.fc2.*`` (``bMlp6``);
  - ``decoder.0-7.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*`` (``Block(attn=LinearAttention2)``).
* **CRR stage II** ``Seg_model_<it>.pth`` / ``Seg_model_last.pth``:
  ``torch.save(segmentation_net.state_dict(), ...)`` (``dinomaly_realiad_uni_second.py:199`` every 4 000 it,
  i.e. ``Seg_model_3999.pth`` and ``Seg_model_7999.pth``, and ``:241``; the test script loads
  ``Seg_model_7999.pth``, ``dinomaly_realiad_uni_test.py:108``). ``DecoderReconstructive(192, 2)`` keys:
  ``up1-4.{1: conv, 2: BatchNorm}``, ``db1-4.{0, 3: conv; 1, 4: BatchNorm}``, ``fin_out.0`` (BatchNorm
  statistics included).
* **Dinomaly** ``model.pth``: the same ``ViTill`` keys with ``bMlp`` (same names as ``bMlp6``)
  (``dinomaly_realiad_uni.py:183``; the MVTec/VisA scripts have the line commented out,
  ``dinomaly_mvtec_uni.py:198,233``, ``dinomaly_visa_uni.py:182,219``; the weights released in the Dinomaly
  README are assumed to be this ``model.state_dict()`` too).

Where our keys come from (``convert_official_checkpoint``; ``V`` = ``model.backbone.model.model.``, the ViT
inside our backbone wrapper):

* ``V.cls_token`` = ``encoder.cls_token + encoder.pos_embed[:, :1]``;
* ``V.reg_token`` = ``encoder.register_tokens``;
* ``V.pos_embed`` = ``encoder.pos_embed[:, 1:]`` resized with DINOv2's rule
  (:func:`mcad.models.backbones.dinov2_interpolate_pos_embed`) to our token grid;
* ``V.patch_embed.*``, ``V.blocks.i.*`` = ``encoder.patch_embed.*``, ``encoder.blocks.i.*`` for the blocks our
  truncated backbone holds (0-9); later blocks, ``encoder.norm`` and ``encoder.mask_token`` are used by neither
  code and dropped;
* ``model.level_proj_i``: empty buffers (ViT levels need no width adapter);
* ``model.bottleneck.fc1/fc2.*`` = ``bottleneck.0.fc1/fc2.*``; ``model.decoder.i.*`` = ``decoder.i.*``;
* ``seg_head.stages.k.up.{0, 1}.*`` = ``up{k+1}.{1, 2}.*``; ``seg_head.stages.k.db.j.*`` = ``db{k+1}.j.*``;
  ``seg_head.final.*`` = ``fin_out.0.*``;
* ``seg_head_active`` = whether a stage-II file is given.

The CLS token is folded with its position entry as timm does for DINOv2 with registers (its
``_convert_dinov2``): the official code adds ``pos_embed[:, 0]`` to the CLS token before inserting the
registers, timm's model adds no position to prefix tokens, so both give the same token sequence.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mcad.models.backbones import dinov2_interpolate_pos_embed

__all__ = [
    "OfficialCheckpointError",
    "convert_official_checkpoint",
    "encoder_key",
    "recon_key",
    "seg_key",
]

# CRRModule.model -> CRRModel.backbone -> TimmBackbone.model (timm feature getter) -> the ViT.
BACKBONE = "model.backbone.model.model."


class OfficialCheckpointError(ValueError):
    """The official file does not have the expected keys or shapes."""


def recon_key(key: str) -> str | None:
    """Our key of an official ``ViTill`` bottleneck / decoder key (``None`` for any other key)."""
    m = re.fullmatch(r"bottleneck\.0\.(fc[12]\.(?:weight|bias))", key)
    if m:
        return f"model.bottleneck.{m.group(1)}"
    m = re.fullmatch(r"decoder\.(\d+)\.((?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias))", key)
    if m:
        return f"model.decoder.{m.group(1)}.{m.group(2)}"
    return None


def encoder_key(key: str, num_blocks: int) -> str | None:
    """Our backbone key of a plain official encoder key (blocks ``>= num_blocks`` and ``norm`` give ``None``).

    ``cls_token``, ``pos_embed`` and ``register_tokens`` need values, not just names: see
    :func:`convert_official_checkpoint`.
    """
    if key.startswith("patch_embed."):
        return BACKBONE + key
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and int(m.group(1)) < num_blocks:
        return BACKBONE + key
    return None


_SEG_BN_OR_CONV = re.compile(r"(up|db)([1-9]\d*)\.(\d+)\.(weight|bias|running_mean|running_var|num_batches_tracked)")


def seg_key(key: str) -> str | None:
    """Our ``seg_head`` key of an official ``DecoderReconstructive`` key (``None`` if it has no counterpart)."""
    m = _SEG_BN_OR_CONV.fullmatch(key)
    if m:
        part, stage, index, leaf = m.group(1), int(m.group(2)) - 1, int(m.group(3)), m.group(4)
        # up_k = Sequential(Upsample, Conv, BN, ReLU): our "up" has no Upsample module, so indices shift by 1.
        index = index - 1 if part == "up" else index
        return f"seg_head.stages.{stage}.{part}.{index}.{leaf}"
    m = re.fullmatch(r"fin_out\.0\.(weight|bias)", key)
    if m:
        return f"seg_head.final.{m.group(1)}"
    return None


def convert_official_checkpoint(
    official: Mapping[str, Tensor],
    seg_model: Mapping[str, Tensor] | None = None,
    *,
    reference: Mapping[str, Tensor] | None = None,
    img_size: int | Sequence[int] = 392,
    patch_size: int = 14,
    num_blocks: int = 10,
    num_levels: int = 8,
    include_backbone: bool = True,
) -> dict[str, Tensor]:
    """Converts an official CRR / Dinomaly ``model.pth`` (and a CRR ``Seg_model_*.pth``) into our state dict.

    Args:
        official: The stage-I ``ViTill`` state dict as loaded from ``model.pth`` (``torch.load``), the same for
            Dinomaly. A bare ``dinov2_vitb14_reg4_pretrain.pth``-style encoder dict (no ``encoder.`` prefix,
            no bottleneck/decoder keys) is accepted too and converts to backbone keys only.
        seg_model: The stage-II ``DecoderReconstructive`` state dict (``Seg_model_7999.pth``), or None
            (reconstruction only: ``seg_head_active`` is False, no ``seg_head.*`` keys).
        reference: Our target state dict (``method.state_dict()``). When given, the output is checked against
            it - every key must exist with the same shape - and ``img_size`` / ``num_blocks`` /
            ``num_levels`` are read from it; keys of ``reference`` the files should provide but do not are
            reported (a bare encoder file provides the backbone keys only: load it with ``strict=False``).
        img_size: Input side our backbone was built for (392 in the recipe): the position table is resized
            to ``img_size // patch_size`` tokens per side with DINOv2's rule. Ignored with ``reference``.
        patch_size: ViT patch size (14).
        num_blocks: Encoder blocks our truncated backbone holds (``max(out_indices) + 1`` = 10).
        num_levels: Feature levels (8), for the empty ``model.level_proj_i`` buffers.
        include_backbone: Convert the encoder too (the official file always holds it). False leaves the
            backbone keys out, e.g. to keep separately loaded weights.

    Returns:
        Our state dict: load it with ``method.load_state_dict(out)`` (strict when ``include_backbone`` and,
        for CRR, ``seg_model`` are given; otherwise ``strict=False`` and only the documented keys are absent).

    Raises:
        OfficialCheckpointError: Missing official keys, unexpected official keys, or shapes that do not fit
            (each listed with its shape); with ``reference``, keys or shapes that do not fit our model.
    """
    state = {str(k): v for k, v in official.items()}
    if any(k.startswith("encoder.") for k in state):
        encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        rest = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    elif "cls_token" in state and "pos_embed" in state:
        encoder, rest = state, {}
    else:
        raise OfficialCheckpointError(
            "Not an official CRR/Dinomaly checkpoint: expected ViTill keys 'encoder.*', 'bottleneck.0.*', "
            f"'decoder.*' (or a bare DINOv2 encoder); first keys: {list(state)[:5]}."
        )

    if reference is not None:
        num_blocks, num_levels, grid = _shape_from_reference(reference, num_blocks, num_levels, patch_size)
    else:
        size = (int(img_size), int(img_size)) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
        grid = (size[0] // patch_size, size[1] // patch_size)

    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    if include_backbone:
        out.update(_convert_encoder(encoder, grid, num_blocks, unexpected))
    for key, value in rest.items():
        ours = recon_key(key)
        if ours is None:
            unexpected.append(f"{key}{_shape(value)}")
            continue
        out[ours] = value.detach().clone()
    if seg_model is not None:
        for key, value in seg_model.items():
            ours = seg_key(str(key))
            if ours is None:
                unexpected.append(f"Seg_model: {key}{_shape(value)}")
                continue
            out[ours] = value.detach().clone()
    if unexpected:
        raise OfficialCheckpointError(f"Unexpected keys in the official file(s): {unexpected[:8]} ({len(unexpected)}).")
    if rest:
        missing = [k for k in _expected_recon_keys(rest) if k not in out]
        if missing:
            raise OfficialCheckpointError(f"Official model.pth lacks {missing[:5]} ({len(missing)} keys).")
        for i in range(num_levels):
            out[f"model.level_proj_{i}"] = torch.empty(0)
    if rest or seg_model is not None:
        out["seg_head_active"] = torch.tensor(seg_model is not None)
    if reference is not None:
        _check_against(out, reference, include_backbone, with_recon=bool(rest), with_seg=seg_model is not None)
    return out


# ------------------------------------------------------------------------------------------ helpers
def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _convert_encoder(
    encoder: Mapping[str, Tensor], grid: tuple[int, int], num_blocks: int, unexpected: list[str]
) -> dict[str, Tensor]:
    missing = [k for k in ("cls_token", "pos_embed", "register_tokens", "patch_embed.proj.weight") if k not in encoder]
    missing += [f"blocks.{i}.*" for i in range(num_blocks) if f"blocks.{i}.norm1.weight" not in encoder]
    if missing:
        raise OfficialCheckpointError(f"Official encoder lacks {missing} (has {len(encoder)} keys).")
    pos = encoder["pos_embed"]
    if pos.dim() != 3 or pos.shape[1] < 2:
        raise OfficialCheckpointError(f"encoder.pos_embed{_shape(pos)} is not a (1, 1 + N, C) table.")
    out = {
        BACKBONE + "cls_token": (encoder["cls_token"] + pos[:, :1]).detach().clone(),
        BACKBONE + "reg_token": encoder["register_tokens"].detach().clone(),
        BACKBONE + "pos_embed": dinov2_interpolate_pos_embed(pos[:, 1:], grid),
    }
    skipped = {"cls_token", "pos_embed", "register_tokens", "mask_token"}
    for key, value in encoder.items():
        if key in skipped:
            continue
        ours = encoder_key(key, num_blocks)
        if ours is not None:
            out[ours] = value.detach().clone()
        elif not (key.startswith("norm.") or key.startswith("blocks.") or key.startswith("head.")):
            unexpected.append(f"encoder.{key}{_shape(value)}")
    return out


def _expected_recon_keys(rest: Mapping[str, Tensor]) -> list[str]:
    blocks = sorted({int(m.group(1)) for k in rest if (m := re.match(r"decoder\.(\d+)\.", k))})
    names = ["norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
    keys = [f"model.bottleneck.{n}.{leaf}" for n in ("fc1", "fc2") for leaf in ("weight", "bias")]
    keys += [f"model.decoder.{i}.{n}.{leaf}" for i in blocks for n in names for leaf in ("weight", "bias")]
    return keys if blocks else keys + ["model.decoder.0.*"]


def _shape_from_reference(
    reference: Mapping[str, Tensor], num_blocks: int, num_levels: int, patch_size: int
) -> tuple[int, int, tuple[int, int]]:
    blocks = {int(m.group(1)) for k in reference if (m := re.match(re.escape(BACKBONE) + r"blocks\.(\d+)\.", k))}
    levels = {int(m.group(1)) for k in reference if (m := re.fullmatch(r"model\.level_proj_(\d+)", k))}
    pos = reference.get(BACKBONE + "pos_embed")
    if pos is None:
        raise OfficialCheckpointError(
            "The reference state dict has no ViT backbone (model.backbone.model.model.pos_embed)."
        )
    side = int(round(pos.shape[1] ** 0.5))
    if side * side != pos.shape[1]:
        raise OfficialCheckpointError(f"Our position table {_shape(pos)} is not square.")
    return (max(blocks) + 1 if blocks else num_blocks), (max(levels) + 1 if levels else num_levels), (side, side)


def _check_against(
    out: Mapping[str, Tensor], reference: Mapping[str, Tensor], include_backbone: bool, with_recon: bool, with_seg: bool
) -> None:
    unknown = [f"{k}{_shape(v)}" for k, v in out.items() if k not in reference]
    wrong = [
        f"{k}: official {_shape(v)} vs ours {_shape(reference[k])}"
        for k, v in out.items()
        if k in reference and tuple(v.shape) != tuple(reference[k].shape)
    ]

    def expected(key: str) -> bool:
        if key.startswith("model.backbone."):
            return include_backbone
        if key.startswith("seg_head."):
            return with_seg
        if key == "seg_head_active":
            return with_recon or with_seg
        return with_recon and key.startswith("model.")

    absent = [k for k in reference if k not in out and expected(k)]
    if unknown or wrong or absent:
        parts = []
        if absent:
            parts.append(f"missing for our model: {absent[:6]} ({len(absent)})")
        if unknown:
            parts.append(f"not in our model: {unknown[:6]} ({len(unknown)})")
        if wrong:
            parts.append(f"shape mismatch: {wrong[:6]} ({len(wrong)})")
        raise OfficialCheckpointError("Converted checkpoint does not fit our model: " + "; ".join(parts) + ".")
