"""Resampling CNN feature levels to one token grid, as two small matrix products.

``F.interpolate(mode="bilinear", antialias=True)`` is what the grid adapter means (area-like when shrinking,
plain bilinear when enlarging), but ONNX has no antialiased resize, so an exported CRR with a CNN backbone
would not trace. The same linear map is separable: ``out = R_h @ x @ R_w^T`` with one weight matrix per
axis. The matrices are built in NumPy from PyTorch's own weight rule (``aten/src/ATen/native/cpu/
UpSampleKernel.cpp``, ``_compute_indices_weights_aa``: triangle filter stretched by the scale when shrinking,
window clipped at the borders, weights renormalised), so they enter a traced graph as constants.
``tests/methods/test_crr_blocks.py`` checks them against ``F.interpolate`` for shrinking and enlarging.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.lru_cache(maxsize=64)
def antialiased_bilinear_weights(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` float64 matrix of antialiased bilinear resampling along one axis."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be positive, got {size_in} -> {size_out}")
    scale = size_in / size_out
    support = max(scale, 1.0)  # the bilinear (triangle) filter has radius 1, stretched when shrinking
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        center = scale * (i + 0.5)
        first = max(int(center - support + 0.5), 0)
        last = min(int(center + support + 0.5), size_in)
        taps = np.arange(first, last)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) / support), 0.0, None)
        weights[i, first:last] = w / w.sum() if w.sum() > 0 else w
    return weights


def resample_to_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C, H, W)``, equal to ``F.interpolate(bilinear, antialias=True)``, ONNX-traceable."""
    # int(): under ONNX tracing shapes are tensors; the sizes are fixed per export, so constants are right
    height, width = int(maps.shape[-2]), int(maps.shape[-1])
    rows = torch.from_numpy(antialiased_bilinear_weights(height, int(grid[0]))).to(maps)
    cols = torch.from_numpy(antialiased_bilinear_weights(width, int(grid[1]))).to(maps)
    return rows @ maps @ cols.T
