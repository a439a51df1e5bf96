"""Input geometry: how an image of any size and aspect becomes the square tensors a method sees, and back.

A method only ever receives batches of square ``S x S`` tensors (``S`` = ``data.image_size``, or
``data.crop_size`` after a centre crop). ``data.geometry`` chooses how an image is brought there:

``squash`` (default, every paper recipe)
    Resize to ``S x S`` whatever the aspect (then the optional centre crop). Faithful to RD4AD, ADer, RLR,
    CRR and Dinomaly, which all squash.
``keep_aspect``
    Resize the longer side to ``S`` (the shorter side to ``round(short * S / long)``), then pad to
    ``S x S`` with the content centred (``(S - h) // 2`` rows above, ``(S - w) // 2`` columns left).
    Padded pixels hold the normalisation mean colour (``round(255 * mean)`` per channel), i.e. about 0
    after normalisation (at most ``0.5 / (255 * std)`` < 0.01), and 0 in the mask. They are **excluded**
    from evaluation: the evaluator cuts every map and mask to the content window before scoring and
    before the pixel metrics (:mod:`mcad.evaluation.stitching`). An optional ``crop_size`` crops the
    padded canvas centrally, as for ``squash``.
``tile``
    Keep the image at a *working resolution* (``tile_scale`` times its own size, the longer side capped
    at ``tile_max_side``, and never smaller than one tile on either side) and cut it into ``S x S`` tiles
    that overlap by at least ``tile_overlap`` of a tile: along each axis the tiles start at
    ``round(linspace(0, L - S, n))`` with the fewest ``n`` whose stride is at most ``S * (1 - overlap)``,
    so the first and the last tile are flush with the borders and no padding is ever needed.
    Training draws one random tile per image and epoch; testing and prediction run every tile of an
    image through the method and stitch the maps (overlaps averaged) into one map of the whole image at
    the working resolution (:mod:`mcad.evaluation.stitching`). ``crop_size`` is not used with tiles.

The inverse transform (:func:`to_native`) brings any map of the model input back onto the image's own
pixel grid: it undoes the centre crop (the map is placed in the crop window, pixels the model never saw
get a fill value), the padding (only the content window is used) and the resize (bilinear, half-pixel
centres, i.e. ``cv2.resize`` when nothing was cropped or padded).

Coordinates: pixel ``i`` covers ``[i, i + 1)``; a :class:`Placement` maps an image coordinate ``u`` to the
model-input coordinate ``u * content / original + offset`` on each axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

__all__ = [
    "GEOMETRIES",
    "Geometry",
    "Placement",
    "Window",
    "pad_to_canvas",
    "tile_positions",
    "to_native",
]

GEOMETRIES = ("squash", "keep_aspect", "tile")

#: ``(top, bottom, left, right)`` of a region of the model input, in input pixels (bottom/right exclusive).
Window = tuple[int, int, int, int]


@dataclass(frozen=True)
class Placement:
    """Where an image's content sits in the model input (see the module docstring for coordinates).

    Attributes:
        original: ``(height, width)`` of the image file.
        content: ``(height, width)`` of the resized image, in input pixels.
        offset: ``(top, left)`` of the resized image in the input (padding minus the crop's offset; negative
            when a crop cuts the content).
        input: ``(height, width)`` of the model input: ``S x S`` (or the crop), for ``tile`` the working
            image (training tiles: the tile, with the tile's position folded into ``offset``).
    """

    original: tuple[int, int]
    content: tuple[int, int]
    offset: tuple[int, int]
    input: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """Input pixels per image pixel, ``(vertical, horizontal)``."""
        return self.content[0] / self.original[0], self.content[1] / self.original[1]

    def window(self) -> Window:
        """The part of the input that shows the image: the content clipped to the input."""
        top, left = max(0, self.offset[0]), max(0, self.offset[1])
        bottom = min(self.input[0], self.offset[0] + self.content[0])
        right = min(self.input[1], self.offset[1] + self.content[1])
        return top, bottom, left, right

    def to_tensor(self) -> torch.Tensor:
        """The eight integers as a ``(8,)`` int64 tensor (collated into ``(B, 8)`` by the loader)."""
        return torch.tensor([*self.original, *self.content, *self.offset, *self.input], dtype=torch.int64)

    @classmethod
    def from_tensor(cls, values: torch.Tensor | Sequence[int]) -> Placement:
        """Inverse of :meth:`to_tensor`."""
        v = [int(x) for x in (values.tolist() if isinstance(values, torch.Tensor) else values)]
        return cls((v[0], v[1]), (v[2], v[3]), (v[4], v[5]), (v[6], v[7]))


def tile_positions(length: int, tile: int, overlap: float) -> list[int]:
    """Start positions of tiles of side ``tile`` covering ``[0, length)`` with at least ``overlap`` shared.

    The first tile starts at 0 and the last ends at ``length``; the positions in between are spread evenly
    (rounded), so every stride is at most ``tile * (1 - overlap)``.
    """
    if length <= tile:
        return [0]
    stride = max(1, math.floor(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return [int(round(p)) for p in np.linspace(0, length - tile, count)]


def pad_to_canvas(array: np.ndarray, size: int, offset: tuple[int, int], fill: Sequence[int] | int) -> np.ndarray:
    """Places an ``h x w [x C]`` array at ``offset`` of an ``size x size`` canvas filled with ``fill``."""
    h, w = array.shape[:2]
    if (h, w) == (size, size):
        return array
    canvas = np.empty((size, size, *array.shape[2:]), dtype=array.dtype)
    canvas[...] = np.asarray(fill, dtype=array.dtype)
    canvas[offset[0] : offset[0] + h, offset[1] : offset[1] + w] = array
    return canvas


@dataclass(frozen=True)
class Geometry:
    """The input geometry of a run (``data.geometry`` and its options; see the module docstring).

    Attributes:
        kind: ``squash``, ``keep_aspect`` or ``tile``.
        size: ``data.image_size``: the square load size, or the tile side.
        crop_size: Optional centre crop of the ``size x size`` canvas (not with ``tile``).
        tile_scale: Working resolution of ``tile`` relative to the image's own size.
        tile_overlap: Least fraction of a tile shared by neighbouring tiles, in ``[0, 1)``.
        tile_max_side: Cap of the working resolution's longer side (``None``: no cap).
    """

    kind: str = "squash"
    size: int = 256
    crop_size: int | None = None
    tile_scale: float = 1.0
    tile_overlap: float = 0.25
    tile_max_side: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in GEOMETRIES:
            raise ValueError(f"data.geometry must be one of {GEOMETRIES}, got '{self.kind}'.")
        if self.kind == "tile" and self.crop_size:
            raise ValueError("data.crop_size is not used with data.geometry=tile (the tile is the input): set it null.")
        if not 0.0 <= self.tile_overlap < 1.0:
            raise ValueError(f"data.tile_overlap must be in [0, 1), got {self.tile_overlap}.")
        if not self.tile_scale > 0:
            raise ValueError(f"data.tile_scale must be positive, got {self.tile_scale}.")
        if self.tile_max_side is not None and self.tile_max_side < self.size:
            raise ValueError(
                f"data.tile_max_side ({self.tile_max_side}) must be at least data.image_size ({self.size})."
            )

    @property
    def input_side(self) -> int:
        """Side of the square tensors the method receives (the tile, the crop, or ``size``)."""
        return self.crop_size or self.size

    def load_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` an image of that size is resized to before padding, cropping or tiling."""
        s = self.size
        if self.kind == "squash":
            return s, s
        if self.kind == "keep_aspect":
            scale = s / max(height, width)
            h, w = (max(1, round(height * scale)), max(1, round(width * scale)))
            return (s, w) if height >= width else (h, s)
        scale = self.tile_scale
        if self.tile_max_side is not None:
            scale = min(scale, self.tile_max_side / max(height, width))
        # At least one tile high and wide: a thinner working image would need padding (invented content).
        scale = max(scale, s / min(height, width))
        return max(s, round(height * scale)), max(s, round(width * scale))

    def canvas_offset(self, height: int, width: int) -> tuple[int, int]:
        """Top-left of a ``keep_aspect`` content of ``(height, width)`` in the ``size x size`` canvas."""
        if self.kind != "keep_aspect":
            return 0, 0
        return (self.size - height) // 2, (self.size - width) // 2

    def placement(self, height: int, width: int) -> Placement:
        """Where an image of ``(height, width)`` ends up in the model input (test and predict time)."""
        content = self.load_size(height, width)
        if self.kind == "tile":
            return Placement((height, width), content, (0, 0), content)
        top, left = self.canvas_offset(*content)
        side = self.size
        if self.crop_size:
            # albumentations' CenterCrop starts at (size - crop) // 2.
            cut = (self.size - self.crop_size) // 2
            top, left, side = top - cut, left - cut, self.crop_size
        return Placement((height, width), content, (top, left), (side, side))

    def tile_grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """Top-left corners of the tiles of a working image of ``(height, width)``, row by row."""
        ys = tile_positions(height, self.size, self.tile_overlap)
        xs = tile_positions(width, self.size, self.tile_overlap)
        return [(y, x) for y in ys for x in xs]

    def cache_tag(self) -> str:
        """What a decoded array depends on besides the size and filter (empty for ``squash``: old caches stay valid)."""
        if self.kind == "squash":
            return ""
        if self.kind == "keep_aspect":
            return "|keep_aspect"
        return f"|tile|{self.tile_scale}|{self.tile_max_side}"

    def describe(self) -> dict[str, object]:
        """The options as a plain dict (results, ``size.json``)."""
        out: dict[str, object] = {"geometry": self.kind, "image_size": self.size, "crop_size": self.crop_size}
        if self.kind == "tile":
            out |= {"tile_scale": self.tile_scale, "tile_overlap": self.tile_overlap}
            out["tile_max_side"] = self.tile_max_side
        return out


def _axis_map(
    n_out: int, scale: float, offset: float, start: int, stop: int, n_map: int
) -> tuple[float, float, np.ndarray]:
    """Affine map from an output (image) pixel index to a map sample position, and which outputs are seen.

    Image pixel centre ``u + 0.5`` -> input coordinate ``c = (u + 0.5) * scale + offset`` -> map coordinate
    ``(c - start) * n_map / (stop - start)``, sampled at index ``coordinate - 0.5``.
    """
    per = n_map / (stop - start)
    a = scale * per
    b = (0.5 * scale + offset - start) * per - 0.5
    centres = (np.arange(n_out) + 0.5) * scale + offset
    return a, b, (centres >= start) & (centres < stop)


def to_native(
    amap: np.ndarray, window: Window | Sequence[int], placement: Placement, fill: float | None = None
) -> np.ndarray:
    """The inverse transform: a map of the input region ``window`` on the image's own ``(H, W)`` grid.

    Args:
        amap: ``(h, w)`` map (any resolution) covering ``window`` of the model input.
        window: ``(top, bottom, left, right)`` of the model input the map covers (for ``squash`` the whole
            input, for ``keep_aspect`` the content window, for ``tile`` the whole working image).
        placement: The image's :class:`Placement`.
        fill: Value of image pixels outside ``window`` (cut away by a centre crop: the model never saw
            them); ``None`` = the map's minimum, so that they never exceed a threshold.

    Returns:
        ``(H, W)`` float32, bilinearly resampled (half-pixel centres; equal to ``cv2.resize`` when the map
        covers the whole image).
    """
    top, bottom, left, right = (int(v) for v in window)
    amap = np.ascontiguousarray(amap, dtype=np.float32)
    (height, width), (sy, sx), (oy, ox) = placement.original, placement.scale, placement.offset
    ay, by, rows = _axis_map(height, sy, oy, top, bottom, amap.shape[0])
    ax, bx, cols = _axis_map(width, sx, ox, left, right, amap.shape[1])
    matrix = np.array([[ax, 0.0, bx], [0.0, ay, by]], dtype=np.float64)
    out = cv2.warpAffine(amap, matrix, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REPLICATE)  # fmt: skip
    if not (rows.all() and cols.all()):
        out[~(rows[:, None] & cols[None, :])] = float(amap.min()) if fill is None else fill
    return out
