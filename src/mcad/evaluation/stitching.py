"""Geometry-aware evaluation of a batch: padding cut away, tiles stitched, one evaluation grid.

:meth:`mcad.methods.base.AnomalyModule.test_step` and ``predict_step`` hand every batch to
:func:`evaluate_batch`. A method still only maps square tensors (``anomaly_maps(images)``); what happens
around it depends on the batch's ``geometry`` (``data.geometry``, see :mod:`mcad.data.geometry`):

``squash``
    Exactly the protocol of :meth:`~mcad.evaluation.protocol.EvalProtocol.process`: the raw maps are
    upsampled to ``protocol.eval_size``, fused, smoothed and scored; masks are resized and binarised.
``keep_aspect``
    The maps are combined (levels fused, segmentation mixed in) at the model input's pixel grid
    (``S x S``), then cut to the image's content window, i.e. the padding is dropped; the content map is
    smoothed and scored (so padding never raises a score), and for the pixel metrics resized to the
    evaluation grid, the mask cut and resized the same way.
``tile``
    Every tile of an image (``tile_grid``) goes through the method, in chunks of ``tile_batch`` tiles;
    each tile's maps are combined at the tile's pixel grid and the tiles are stitched into one map of the
    whole working-resolution image, overlapping pixels averaged. The stitched map is smoothed and scored
    (the image score is the protocol's rule over the whole stitched map) and, for the pixel metrics,
    resized to the evaluation grid with the working-resolution mask.

**The evaluation grid.** The exact metrics need one map size for the whole test set, so every evaluated
map and mask is brought to ``protocol.eval_size`` (``S`` for ``S x S``, or ``[height, width]`` for
non-square data): bilinear, half-pixel centres, antialiased when shrinking, masks binarised after the
resize with the protocol's ``gt_threshold``. The metrics are exact on that grid. Smoothing
(``protocol.sigma``) is in pixels of the model input (the ``S x S`` canvas, or the working resolution
for tiles), which equal evaluation pixels for the default ``image_size = eval_size = 256``; the image
score is taken before the resize to the grid, on the full-resolution content map.

Every image also keeps its *content map* (the evaluated map before the resize to the grid) and the
window of the model input it covers, from which :func:`mcad.data.geometry.to_native` draws it at the
image's own resolution (``mcad-predict``, the visualiser).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol

__all__ = ["EvaluatedBatch", "Stitcher", "evaluate_batch", "resize_to_grid", "stitch"]

MapFunction = Callable[[Tensor], AnomalyMaps]


@dataclass
class EvaluatedBatch:
    """The evaluation of a batch of images (see the module docstring).

    Attributes:
        pixel_maps: ``(B, H, W)`` float32 evaluated maps at the evaluation grid (what the metrics see).
        scores: ``(B,)`` image scores.
        content_maps: Per image, the evaluated map before the resize to the grid, covering ``windows[i]``
            of the model input at its pixel grid (``squash``: the grid maps themselves).
        windows: ``(B, 4)`` int64 ``(top, bottom, left, right)`` of the model input each content map covers.
        tiles: ``(B,)`` int64 forward passes per image (tiles; 1 without tiling).
        masks: ``(B, H, W)`` uint8 binarised ground truth at the grid, when the batch has masks.
    """

    pixel_maps: Tensor
    scores: Tensor
    content_maps: list[Tensor]
    windows: Tensor
    tiles: Tensor
    masks: Tensor | None = None


class Stitcher:
    """Sums tile maps into one ``size`` map and counts how often each pixel was covered (overlaps averaged).

    Args:
        size: ``(height, width)`` of the stitched map.
        like: A tensor whose device the sums live on.
    """

    def __init__(self, size: Sequence[int], like: Tensor) -> None:
        self.total = like.new_zeros((int(size[0]), int(size[1])), dtype=torch.float32)
        self.count = torch.zeros_like(self.total)

    def add(self, tile_map: Tensor, top: int, left: int) -> None:
        """Adds one ``(t, t')`` tile map with its top-left corner at ``(top, left)``."""
        th, tw = tile_map.shape[-2:]
        self.total[top : top + th, left : left + tw] += tile_map
        self.count[top : top + th, left : left + tw] += 1

    def result(self) -> Tensor:
        """The averaged map.

        Raises:
            ValueError: Some pixel is covered by no tile.
        """
        if bool((self.count == 0).any()):
            raise ValueError(f"The tiles do not cover the {self.total.shape[0]}x{self.total.shape[1]} image.")
        return self.total / self.count


def stitch(tile_maps: Tensor, positions: Tensor | Sequence[Sequence[int]], size: Sequence[int]) -> Tensor:
    """``(T, t, t)`` tile maps placed at their ``(top, left)`` positions in a ``size`` map, overlaps averaged.

    Raises:
        ValueError: Some pixel of ``size`` is covered by no tile.
    """
    stitcher = Stitcher(size, tile_maps)
    for tile, (top, left) in zip(tile_maps, torch.as_tensor(positions).tolist()):
        stitcher.add(tile, top, left)
    return stitcher.result()


def resize_to_grid(maps: Tensor, size: Sequence[int]) -> Tensor:
    """``(B, h, w)`` -> ``(B, H, W)`` float32: bilinear with half-pixel centres, antialiased when shrinking."""
    size = (int(size[0]), int(size[1]))
    maps = maps.float()
    if tuple(maps.shape[-2:]) == size:
        return maps
    shrink = maps.shape[-2] > size[0] or maps.shape[-1] > size[1]
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False,
                         antialias=shrink).squeeze(1)  # fmt: skip


def _items(value: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return list(value.unbind(0)) if isinstance(value, Tensor) else list(value)


def _windows(placements: Tensor) -> Tensor:
    """``(B, 4)`` content windows of ``(B, 8)`` placements (see :class:`mcad.data.geometry.Placement`)."""
    p = placements.long()
    top, left = p[:, 4].clamp(min=0), p[:, 5].clamp(min=0)
    bottom = torch.minimum(p[:, 6], p[:, 4] + p[:, 2])
    right = torch.minimum(p[:, 7], p[:, 5] + p[:, 3])
    return torch.stack([top, bottom, left, right], dim=1)


def _finish(
    protocol: EvalProtocol,
    content: list[Tensor],
    windows: Tensor,
    tiles: Tensor,
    masks: list[Tensor] | None,
) -> EvaluatedBatch:
    """Smooths and scores per-image content maps; brings maps and masks to the evaluation grid."""
    grid = protocol.eval_hw
    pixel, scores, kept = [], [], []
    for amap in content:
        smoothed = protocol.smooth(amap.unsqueeze(0))
        scores.append(protocol.reduce(smoothed)[0])
        chosen = smoothed if protocol.smooth_for_pixel else amap.unsqueeze(0)
        kept.append(chosen[0])
        pixel.append(resize_to_grid(chosen, grid)[0])
    gt = None
    if masks is not None:
        gt = torch.cat([protocol.binarize_masks(resize_to_grid(m.unsqueeze(0), grid)) for m in masks])
    return EvaluatedBatch(torch.stack(pixel), torch.stack(scores), kept, windows, tiles, gt)


def evaluate_batch(anomaly_maps: MapFunction, protocol: EvalProtocol, batch: dict[str, Any]) -> EvaluatedBatch:
    """Evaluates a test or predict batch under its geometry (see the module docstring).

    Args:
        anomaly_maps: The method's inference entry (square tensors in, :class:`AnomalyMaps` out).
        protocol: The run's protocol.
        batch: A loader batch: ``image`` and, when present, ``mask``, ``geometry``, ``placement``,
            ``tile_grid``, ``tile_size`` and ``tile_batch`` (:class:`mcad.data.dataset.AnomalyDataset`). A
            batch without ``geometry`` is a ``squash`` batch.
    """
    kinds = batch.get("geometry")
    kind = str(kinds[0]) if kinds else "squash"
    images = batch["image"]
    masks = batch.get("mask")
    if kind == "squash":
        out = anomaly_maps(images)
        pixel_maps, scores = protocol.process(out.anomaly_map, out.segmentation, tuple(images.shape[-2:]))
        b, _, h, w = images.shape
        windows = torch.tensor([[0, h, 0, w]], dtype=torch.int64).repeat(b, 1)
        gt = protocol.binarize_masks(masks) if masks is not None else None
        ones = torch.ones(b, dtype=torch.int64)
        return EvaluatedBatch(pixel_maps, scores, list(pixel_maps.unbind(0)), windows, ones, gt)
    placements = batch["placement"]
    windows = _windows(placements).cpu()
    if kind == "keep_aspect":
        out = anomaly_maps(images)
        combined = protocol.combine(out.anomaly_map, out.segmentation, tuple(images.shape[-2:]))
        boxes = windows.tolist()
        content = [combined[i, top:bottom, left:right] for i, (top, bottom, left, right) in enumerate(boxes)]
        cut = None
        if masks is not None:
            cut = [masks[i, 0, top:bottom, left:right] for i, (top, bottom, left, right) in enumerate(boxes)]
        return _finish(protocol, content, windows, torch.ones(len(content), dtype=torch.int64), cut)
    if kind != "tile":
        raise ValueError(f"Unknown geometry '{kind}' in the batch.")
    image_list, grids = _items(images), [g.tolist() for g in _items(batch["tile_grid"])]
    chunk = max(1, int(torch.as_tensor(batch["tile_batch"]).reshape(-1)[0]))
    side = int(torch.as_tensor(batch["tile_size"]).reshape(-1)[0])
    stitchers = [Stitcher(image.shape[-2:], image) for image in image_list]
    # The tiles of all images of the batch go through the method together, ``chunk`` at a time; each chunk
    # is stitched at once, so no more than one chunk of tiles and maps exists besides the stitched sums.
    jobs = [(i, top, left) for i, grid in enumerate(grids) for top, left in grid]
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        tiles = torch.stack([image_list[i][:, y : y + side, x : x + side] for i, y, x in part])
        out = anomaly_maps(tiles)
        combined = protocol.combine(out.anomaly_map, out.segmentation, (side, side))
        for tile_map, (i, y, x) in zip(combined, part):
            stitchers[i].add(tile_map, y, x)
    content = [stitcher.result() for stitcher in stitchers]
    counts = torch.tensor([len(grid) for grid in grids], dtype=torch.int64)
    mask_list = [m[0] for m in _items(masks)] if masks is not None else None
    return _finish(protocol, content, windows, counts, mask_list)
