"""Drawing anomaly maps: denormalised images, heat maps, ground-truth and thresholded overlays (NumPy + OpenCV).

All images are RGB ``uint8`` ``(H, W, 3)`` arrays; maps are float ``(H, W)`` evaluated maps (the protocol's
output on its evaluation grid, or brought back to the image's own resolution by
:func:`mcad.data.geometry.to_native`). Colours: the heat map is OpenCV's JET map (blue = low, red = high) scaled to
a caller-given range, ground truth is drawn in green, predicted regions in red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)


def denormalize(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float], size: int | Sequence[int] | None = None
) -> np.ndarray:
    """A normalised ``(3, H, W)`` tensor back to an RGB ``uint8`` array, optionally resized.

    Args:
        image: The normalised image.
        mean: Normalisation mean.
        std: Normalisation std.
        size: Side of a square output, or ``(height, width)``; ``None`` keeps the size.
    """
    x = image.detach().float().cpu()
    x = x * torch.tensor(std, dtype=x.dtype).view(3, 1, 1) + torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    array = (x.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        if array.shape[:2] != (h, w):
            shrink = array.shape[0] > h or array.shape[1] > w
            array = cv2.resize(array, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return np.ascontiguousarray(array)


def heat_map(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """RGB JET colouring of a map scaled linearly from ``[low, high]`` to ``[0, 1]`` (clipped)."""
    span = high - low if high > low else 1.0
    scaled = np.clip((anomaly_map.astype(np.float64) - low) / span, 0.0, 1.0)
    coloured = cv2.applyColorMap((scaled * 255.0 + 0.5).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * overlay``."""
    return cv2.addWeighted(image, 1.0 - alpha, overlay, alpha, 0.0)


def draw_region(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], fill: float = 0.0) -> np.ndarray:
    """Draws the outline of a binary mask (and optionally a translucent fill) on a copy of ``image``."""
    out = image.copy()
    binary = (mask > 0).astype(np.uint8)
    if fill > 0 and binary.any():
        tint = out.copy()
        tint[binary > 0] = colour
        out = cv2.addWeighted(out, 1.0 - fill, tint, fill, 0.0)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _titled(tile: np.ndarray, title: str, bar: int) -> np.ndarray:
    header = np.full((bar, tile.shape[1], 3), 255, dtype=np.uint8)
    scale = max(0.3, min(0.5, tile.shape[1] / 512))
    cv2.putText(header, title, (3, bar - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, tile], axis=0)


def panel(
    image: np.ndarray,
    gt_mask: np.ndarray | None,
    anomaly_map: np.ndarray,
    low: float,
    high: float,
    threshold: float | None,
    caption: str = "",
) -> np.ndarray:
    """The four-tile overlay: image | ground truth | heat map | thresholded map.

    Args:
        image: RGB ``uint8`` image at the map's size.
        gt_mask: Binary ground truth at the map's size, or ``None`` (unlabelled images: the tile shows the
            image alone).
        anomaly_map: Evaluated map.
        low: Map value drawn blue.
        high: Map value drawn red.
        threshold: Pixels above it form the predicted region of the last tile (outlined and filled red,
            with the ground truth outlined green); ``None`` leaves the tile as the plain heat map.
        caption: Text of a caption line above the tiles.
    """
    size = anomaly_map.shape[0]
    bar = max(14, min(size, 512) // 14)
    gt = np.zeros_like(image) if gt_mask is None else np.repeat((gt_mask > 0)[..., None] * 255, 3, axis=2)
    gt = gt.astype(np.uint8)
    heat = blend(image, heat_map(anomaly_map, low, high))
    if threshold is not None:
        pred = draw_region(image, anomaly_map > threshold, PRED_COLOUR, fill=0.4)
        if gt_mask is not None:
            pred = draw_region(pred, gt_mask, GT_COLOUR)
        pred_title = f"map > {threshold:.3g}"
    else:
        pred, pred_title = heat_map(anomaly_map, low, high), "map"
    tiles = [
        _titled(image, "image", bar),
        _titled(gt, "ground truth" if gt_mask is not None else "no ground truth", bar),
        _titled(heat, f"heat [{low:.3g}, {high:.3g}]", bar),
        _titled(pred, pred_title, bar),
    ]
    out = np.concatenate(tiles, axis=1)
    if caption:
        out = _titled(out, caption, bar)
    return out


def write_png(path: str | Path, rgb: np.ndarray) -> None:
    """Writes an RGB array as PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"Could not write {path}")
