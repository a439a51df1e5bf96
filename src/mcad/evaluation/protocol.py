"""The evaluation protocol: how raw anomaly maps become evaluated maps, image scores and masks.

Every method returns raw maps (any resolution, unbounded scores) and, optionally, a segmentation
probability map. This module alone decides upsampling, fusion, smoothing, the image-score rule and
ground-truth binarisation, so two methods are always compared under the same, named rules. The
protocol is recorded in every results file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SMOOTHING = ("gaussian", "none")
MASK_RESIZES = ("bilinear", "nearest")
REDUCERS = ("max", "topk_mean")
BORDERS = ("reflect", "constant")


@dataclass
class AnomalyMaps:
    """A method's raw output for a batch of images: the one thing evaluation receives from a method.

    Attributes:
        anomaly_map: ``(B, 1, h, w)`` anomaly scores at any resolution (unbounded), or a list of per-level
            maps at their own resolutions: the protocol then upsamples every level straight to the
            evaluation size and averages them, as the official RD, ADer and RLR code do (upsampling a fused
            coarse map instead is not the same: bilinear after bilinear is not bilinear).
        segmentation: Optional ``(B, 1, h', w')`` anomaly probability from a segmentation head.
    """

    anomaly_map: Tensor | list[Tensor]
    segmentation: Tensor | None = None


@dataclass
class EvalProtocol:
    """Post-processing and scoring rules (defaults: the shared protocol, docs/evaluation.md).

    Attributes:
        name: Name recorded in results (``mcad``, ``dinomaly``, ``rlr`` ...).
        eval_size: Side of the square evaluation resolution.
        eval_shape: ``(height, width)`` of a non-square evaluation grid instead (``None``: ``eval_size``
            square). For non-square data under ``data.geometry=keep_aspect`` / ``tile``, whose evaluated maps
            and masks are all brought to this one grid (:mod:`mcad.evaluation.stitching`).
        gt_threshold: Masks (bilinear-resized, in [0, 1]) are binarised as ``mask > gt_threshold``.
        gt_inclusive: Binarise as ``mask >= gt_threshold`` instead (CRR's loader).
        mask_resize: How masks reach the evaluation grid: ``bilinear`` (mcad, ADer, CRR) or ``nearest``
            (Dinomaly's evaluation, ``utils.py::evaluation_batch``).
        resize_via_input: Resize maps to the model input's size first (bilinear, ``align_corners=True``) and
            from there to the evaluation grid (bilinear, ``align_corners=False``), as Dinomaly's evaluation does
            (392, then 256); ``False`` = straight to the grid (mcad, ADer, RLR, CRR).
        smoothing: ``gaussian`` or ``none``.
        sigma: Gaussian sigma in pixels of the evaluation resolution.
        kernel_size: Gaussian support; ``None`` = scipy's ``gaussian_filter`` default
            (``2 * round(4 * sigma) + 1``, i.e. 33 for sigma 4). Dinomaly/CRR use 5.
        border: ``reflect`` (scipy's default, half-sample symmetric) or ``constant`` (zero padding,
            as Dinomaly's convolution).
        image_score: ``max`` or ``topk_mean`` of the smoothed map.
        topk_ratio: Fraction of pixels averaged by ``topk_mean`` (Dinomaly: 0.01).
        smooth_for_pixel: Pixel metrics on the smoothed map (True) or on the raw upsampled map
            (False, as RLR's code computes pixel AUROC before smoothing).
        seg_weight: Weight of the segmentation probability when a method returns one:
            ``map = (1 - seg_weight) * reconstruction + seg_weight * segmentation`` (CRR: 0.3).
        fpr_limit: AUPRO integration limit.
    """

    name: str = "mcad"
    eval_size: int = 256
    eval_shape: tuple[int, int] | None = None
    gt_threshold: float = 0.5
    gt_inclusive: bool = False
    mask_resize: str = "bilinear"
    resize_via_input: bool = False
    smoothing: str = "gaussian"
    sigma: float = 4.0
    kernel_size: int | None = None
    border: str = "reflect"
    image_score: str = "max"
    topk_ratio: float = 0.01
    smooth_for_pixel: bool = True
    seg_weight: float = 0.3
    fpr_limit: float = 0.3

    def __post_init__(self) -> None:
        if self.eval_shape is not None:
            shape = tuple(int(v) for v in self.eval_shape)
            if len(shape) != 2:
                raise ValueError(f"protocol.eval_shape must be [height, width] or null, got {self.eval_shape}.")
            self.eval_shape = (shape[0], shape[1])
        if min(self.eval_hw) < 1:
            raise ValueError(f"protocol.eval_size / eval_shape must be positive, got {self.eval_hw}.")
        if self.mask_resize not in MASK_RESIZES:
            raise ValueError(f"protocol.mask_resize must be one of {MASK_RESIZES}, got '{self.mask_resize}'.")
        if self.smoothing not in SMOOTHING:
            raise ValueError(f"protocol.smoothing must be one of {SMOOTHING}, got '{self.smoothing}'.")
        if self.image_score not in REDUCERS:
            raise ValueError(f"protocol.image_score must be one of {REDUCERS}, got '{self.image_score}'.")
        if self.border not in BORDERS:
            raise ValueError(f"protocol.border must be one of {BORDERS}, got '{self.border}'.")
        if not 0.0 <= self.seg_weight <= 1.0:
            raise ValueError(f"protocol.seg_weight must be in [0, 1], got {self.seg_weight}.")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ValueError(f"protocol.topk_ratio must be in (0, 1], got {self.topk_ratio}.")
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise ValueError(f"protocol.kernel_size must be odd, got {self.kernel_size}.")

    @property
    def eval_hw(self) -> tuple[int, int]:
        """``(height, width)`` of the evaluation grid."""
        return self.eval_shape if self.eval_shape is not None else (self.eval_size, self.eval_size)

    def to_dict(self) -> dict:
        """Plain dict for results files and loggers."""
        out = asdict(self)
        if self.eval_shape is not None:
            out["eval_shape"] = list(self.eval_shape)
        return out

    # ------------------------------------------------------------------------------ building blocks
    def gaussian_kernel(self, device: torch.device | None = None) -> Tensor:
        """1-D normalised Gaussian taps (the 2-D kernel is separable)."""
        radius = (self.kernel_size // 2) if self.kernel_size else int(4.0 * self.sigma + 0.5)
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        taps = torch.exp(-0.5 * (x / self.sigma) ** 2)
        return (taps / taps.sum()).to(device=device, dtype=torch.float32)

    def smooth(self, maps: Tensor) -> Tensor:
        """Gaussian smoothing of ``(B, H, W)`` maps.

        Equal to scipy's ``gaussian_filter`` with its default ``reflect`` border, or zero padding for
        ``border=constant``.
        """
        if self.smoothing == "none":
            return maps
        taps = self.gaussian_kernel(maps.device).to(maps.dtype)
        radius = taps.numel() // 2
        x = maps.unsqueeze(1)
        for dim in (2, 3):
            x = _pad_1d(x, radius, dim, self.border)
            weight = taps.view(1, 1, -1, 1) if dim == 2 else taps.view(1, 1, 1, -1)
            x = F.conv2d(x, weight)
        return x.squeeze(1)

    def reduce(self, maps: Tensor) -> Tensor:
        """Image scores from ``(B, H, W)`` maps."""
        flat = maps.flatten(1)
        if self.image_score == "max":
            return flat.amax(dim=1)
        k = max(1, int(flat.shape[1] * self.topk_ratio))
        return flat.topk(k, dim=1).values.mean(dim=1)

    # ------------------------------------------------------------------------------ the pipeline
    def process(
        self,
        anomaly_map: Tensor | Sequence[Tensor],
        segmentation: Tensor | None = None,
        input_size: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Turns a method's raw output into evaluated pixel maps and image scores.

        Args:
            anomaly_map: ``(B, 1, h, w)`` or ``(B, h, w)`` raw map, higher = more anomalous, or per-level
                maps, each upsampled straight to ``eval_size`` and then averaged.
            segmentation: Optional ``(B, 1, h', w')`` anomaly probability of a segmentation head.
            input_size: ``(H, W)`` of the images the maps come from (used by ``resize_via_input``).

        Returns:
            ``(pixel_maps, image_scores)``: ``(B, H, W)`` float32 maps at ``eval_size`` (smoothed or
            not, per ``smooth_for_pixel``) and ``(B,)`` scores from the smoothed map.
        """
        if self.resize_via_input and input_size is None:
            raise ValueError("protocol.resize_via_input needs the input size: process(..., input_size=(H, W)).")
        via = input_size if self.resize_via_input else None  # upsample() takes tuple(via) itself
        maps = self.combine(anomaly_map, segmentation, via=via)
        smoothed = self.smooth(maps)
        pixel_maps = smoothed if self.smooth_for_pixel else maps
        return pixel_maps, self.reduce(smoothed)

    def combine(
        self,
        anomaly_map: Tensor | Sequence[Tensor],
        segmentation: Tensor | None = None,
        size: tuple[int, int] | None = None,
        via: tuple[int, int] | None = None,
    ) -> Tensor:
        """Steps 1-2 of :meth:`process`: levels fused and the segmentation mixed in, at ``size`` (default: the grid).

        ``data.geometry=keep_aspect`` / ``tile`` combine at the model input's own pixel grid (``size``) and
        smooth and score after cutting away the padding or stitching the tiles.
        """
        maps = self.fuse(anomaly_map, size, via)
        if segmentation is not None and self.seg_weight > 0:
            maps = (1.0 - self.seg_weight) * maps + self.seg_weight * self.upsample(segmentation, size, via)
        return maps

    def fuse(
        self, levels: Tensor | Sequence[Tensor], size: tuple[int, int] | None = None, via: tuple[int, int] | None = None
    ) -> Tensor:
        """``(B, H, W)`` mean of per-level maps, each upsampled straight to ``size`` (default ``eval_size``)."""
        if isinstance(levels, Tensor):
            return self.upsample(levels, size, via)
        if not levels:
            raise ValueError("A method returned an empty list of anomaly maps.")
        return torch.stack([self.upsample(level, size, via) for level in levels]).mean(dim=0)

    def upsample(self, maps: Tensor, size: tuple[int, int] | None = None, via: tuple[int, int] | None = None) -> Tensor:
        """Bilinear (align_corners=True) resize of ``(B, 1, h, w)`` or ``(B, h, w)`` to ``size`` (default: the grid).

        With ``via``, the map is first resized to ``via`` (align_corners=True) and from there to ``size``
        (align_corners=False): Dinomaly's two-step evaluation resize.
        """
        if maps.dim() == 3:
            maps = maps.unsqueeze(1)
        maps = maps.float()
        out_size = tuple(size) if size is not None else self.eval_hw
        if via is not None and tuple(maps.shape[-2:]) != out_size:
            if tuple(maps.shape[-2:]) != tuple(via):
                maps = F.interpolate(maps, size=tuple(via), mode="bilinear", align_corners=True)
            if tuple(via) != out_size:
                maps = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=False)
        elif tuple(maps.shape[-2:]) != out_size:
            maps = F.interpolate(maps, size=out_size, mode="bilinear", align_corners=True)
        return maps.squeeze(1)

    def binarize_masks(self, masks: Tensor) -> Tensor:
        """``(B, 1, h, w)`` masks in [0, 1] -> ``(B, H, W)`` uint8 {0, 1} on the grid: resize, threshold."""
        if masks.dim() == 3:
            masks = masks.unsqueeze(1)
        masks = masks.float()
        if tuple(masks.shape[-2:]) != self.eval_hw:
            if self.mask_resize == "nearest":
                masks = F.interpolate(masks, size=self.eval_hw, mode="nearest")
            else:
                masks = F.interpolate(masks, size=self.eval_hw, mode="bilinear", align_corners=False)
        masks = masks.squeeze(1)
        binary = masks >= self.gt_threshold if self.gt_inclusive else masks > self.gt_threshold
        return binary.to(torch.uint8)


def _pad_1d(x: Tensor, radius: int, dim: int, border: str) -> Tensor:
    """Pads one spatial dim of a 4-D tensor by ``radius`` with scipy's ``reflect`` or zeros."""
    if radius == 0:
        return x
    if border == "constant":
        pad = (0, 0, radius, radius) if dim == 2 else (radius, radius, 0, 0)
        return F.pad(x, pad)
    n = x.shape[dim]
    # scipy 'reflect' = half-sample symmetric: (d c b a | a b c d | d c b a); a periodic index map
    # handles radii larger than the signal too.
    idx = torch.arange(-radius, n + radius, device=x.device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    idx = torch.where(idx >= n, period - 1 - idx, idx)
    return x.index_select(dim, idx)
