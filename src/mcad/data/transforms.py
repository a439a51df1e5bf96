"""Deterministic image and mask preprocessing: resizing filters, centre crop, normalisation.

The official codes resize with different libraries and filters, and the difference is visible in the
numbers (a few grey levels on average, tens at edges; 0.14 % of positive mask pixels), so the filter is a
data option that each paper recipe sets to its official code's choice:

=============== ==================================================================================
image filter    what it reproduces
=============== ==================================================================================
``area``        cv2 ``INTER_AREA`` when shrinking, ``INTER_LINEAR`` when enlarging (mcad's default)
``pil_bilinear`` PIL's bilinear resize (a triangle filter widened by the scale factor, i.e. antialiased):
                torchvision ``Resize`` on PIL images, as in ADer / RD4AD / CCL / CRR / Dinomaly
``pil_lanczos`` PIL's Lanczos (``Image.ANTIALIAS``), as in RLR ``datasets/base.py``
``cv2_linear``  cv2 ``INTER_LINEAR`` (no antialiasing)
=============== ==================================================================================

=============== ==================================================================================
mask filter     what it reproduces
=============== ==================================================================================
``cv2_linear``  cv2 ``INTER_LINEAR`` of the {0, 255} mask (mcad's default; binarised by the protocol)
``pil_bilinear`` PIL's bilinear resize, as torchvision ``Resize`` on a mask image (ADer, RD4AD, CRR)
``nearest``     PIL's nearest neighbour (RLR), i.e. the mask stays binary
=============== ==================================================================================

Masks can also be binarised right after resizing (``mask_threshold``, kept as ``>=`` threshold): CRR's
loader does so at its crop size before the evaluator resizes them again to 256.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from mcad.data.geometry import Geometry

__all__ = [
    "IMAGE_FILTERS",
    "MASK_FILTERS",
    "Normalizer",
    "Resize",
    "build_transform",
    "resize_image",
    "resize_mask",
]

IMAGE_FILTERS = ("area", "pil_bilinear", "pil_lanczos", "cv2_linear")
MASK_FILTERS = ("cv2_linear", "pil_bilinear", "nearest")

_PIL_FILTERS = {
    "pil_bilinear": Image.Resampling.BILINEAR,
    "pil_lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


def _check(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got '{value}'.")


def _pil_resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample=resample))


def resize_image(image: np.ndarray, size: int | tuple[int, int], filter: str = "area") -> np.ndarray:
    """Resizes an ``H×W×3`` uint8 image to ``size`` (aspect ratio not kept, as RD / ADer / RLR / CRR do).

    Args:
        image: The decoded image.
        size: Side of the square output, or ``(height, width)``.
        filter: One of :data:`IMAGE_FILTERS` (see the module docstring).

    Returns:
        The resized uint8 image (the input itself when it already has the size).
    """
    _check("data.image_filter", filter, IMAGE_FILTERS)
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    if filter in _PIL_FILTERS:
        return _pil_resize(image, (h, w), _PIL_FILTERS[filter])
    shrinking = image.shape[0] > h or image.shape[1] > w
    interpolation = cv2.INTER_AREA if filter == "area" and shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=interpolation)


def resize_mask(
    mask: np.ndarray, size: int | tuple[int, int], filter: str = "cv2_linear", threshold: float | None = None
) -> np.ndarray:
    """Resizes an ``H×W`` uint8 {0, 255} mask; optionally binarises it again (``>= threshold``, in [0, 1]).

    Args:
        mask: The decoded mask.
        size: Side of the square output, or ``(height, width)``.
        filter: One of :data:`MASK_FILTERS`.
        threshold: Binarise the resized mask as ``mask / 255 >= threshold`` (CRR's loader: 0.5); ``None``
            keeps the interpolated grey levels for the evaluator's own threshold.

    Returns:
        The resized uint8 mask in 0..255.
    """
    _check("data.mask_filter", filter, MASK_FILTERS)
    h, w = (size, size) if isinstance(size, int) else size
    if mask.shape[:2] != (h, w):
        if filter in _PIL_FILTERS:
            mask = _pil_resize(mask, (h, w), _PIL_FILTERS[filter])
        else:
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_LINEAR)
    if threshold is not None:
        mask = np.where(mask.astype(np.float32) / 255.0 >= threshold, 255, 0).astype(np.uint8)
    return mask


@dataclass(frozen=True)
class Resize:
    """How decoded images and masks are brought to the load size (``data.image_size``).

    Attributes:
        size: Side of the square load size.
        image_filter: One of :data:`IMAGE_FILTERS`.
        mask_filter: One of :data:`MASK_FILTERS`.
        mask_threshold: Binarise masks right after resizing (``>=``, in [0, 1]); ``None`` = keep grey levels.
        geometry: The input geometry (:mod:`mcad.data.geometry`); ``None`` = ``squash`` to ``size``. With
            ``keep_aspect`` the load size is the aspect-kept content (longer side ``size``), with ``tile``
            the working resolution.
    """

    size: int
    image_filter: str = "area"
    mask_filter: str = "cv2_linear"
    mask_threshold: float | None = None
    geometry: Geometry | None = None

    def __post_init__(self) -> None:
        _check("data.image_filter", self.image_filter, IMAGE_FILTERS)
        _check("data.mask_filter", self.mask_filter, MASK_FILTERS)
        if self.mask_threshold is not None and not 0.0 < self.mask_threshold <= 1.0:
            raise ValueError(f"data.mask_threshold must be in (0, 1] or null, got {self.mask_threshold}.")
        if self.geometry is not None and self.geometry.size != self.size:
            raise ValueError(f"Resize.size ({self.size}) and its geometry's size ({self.geometry.size}) differ.")

    def target(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` of an image or mask of that size after resizing."""
        return (self.size, self.size) if self.geometry is None else self.geometry.load_size(height, width)

    def image(self, image: np.ndarray) -> np.ndarray:
        """The image at the load size."""
        return resize_image(image, self.target(*image.shape[:2]), self.image_filter)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """The mask at the load size."""
        return resize_mask(mask, self.target(*mask.shape[:2]), self.mask_filter, self.mask_threshold)

    def cache_tag(self, kind: str) -> str:
        """What a cached array of ``kind`` (``image`` / ``mask``) depends on besides its file."""
        shape = self.geometry.cache_tag() if self.geometry is not None else ""
        if kind == "image":
            return f"{self.size}|{self.image_filter}{shape}"
        return f"{self.size}|{self.mask_filter}|{self.mask_threshold}{shape}"


class Normalizer:
    """uint8 ``C×H×W`` tensor -> normalised float tensor.

    In torch: several times faster than albumentations' ``Normalize`` on the loader's hot path.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = (255.0 * torch.tensor(std, dtype=torch.float32)).view(-1, 1, 1)
        self.shift = (255.0 * torch.tensor(mean, dtype=torch.float32)).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image.float() - self.shift) / self.scale


def build_transform(crop_size: int | None, extra_targets: bool = False) -> A.Compose:
    """Geometric steps (optional centre crop) and conversion to uint8 tensors; images are resized before."""
    steps: list[A.BasicTransform] = []
    if crop_size:
        steps.append(A.CenterCrop(crop_size, crop_size))
    steps.append(ToTensorV2())
    targets = {"synthetic_image": "image", "synthetic_mask": "mask"} if extra_targets else {}
    return A.Compose(steps, additional_targets=targets)
