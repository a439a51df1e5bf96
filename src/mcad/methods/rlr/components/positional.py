"""Fixed 2-D sinusoidal positional encodings for token grids.

The layout follows the official RLR ``models/embedding.py::PositionalEmbedding`` (re-implemented, see the
"Architecture" section of ``src/mcad/methods/rlr/README.md``): the first ``d/2`` channels encode the
column (x) coordinate and the last ``d/2`` channels the row (y) coordinate; inside each half, channel
``2i`` is ``sin(pos * w_i)`` and channel ``2i + 1`` is ``cos(pos * w_i)`` with
``w_i = base ** (-2i / (d/2))``. Tokens are ordered row-major (token ``r * w + c`` is row ``r``,
column ``c``), which is the order produced by ``features.permute(0, 2, 3, 1).reshape(B, h * w, C)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_position_encoding_2d(
    height: int,
    width: int,
    dim: int,
    base: float = 1e4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Builds the 2-D sinusoidal encoding of an ``height x width`` token grid.

    Args:
        height: Number of grid rows ``h``.
        width: Number of grid columns ``w``.
        dim: Encoding width ``d``; must be a multiple of 4 (two halves of sin/cos pairs).
        base: Frequency base (``1e4`` as in the Transformer and RLR).
        dtype: Output dtype.
        device: Output device.

    Returns:
        A ``(h * w, d)`` tensor; row ``r * w + c`` is the encoding of grid cell ``(r, c)``.

    Raises:
        ValueError: ``dim`` is not a positive multiple of 4 or the grid is empty.

    """
    if dim <= 0 or dim % 4 != 0:
        raise ValueError(f"2-D sinusoidal encoding needs a positive multiple of 4 channels, got {dim}.")
    if height <= 0 or width <= 0:
        raise ValueError(f"Grid must be non-empty, got {height}x{width}.")
    half = dim // 2
    # Frequencies w_i = base^(-2i / half) for i = 0 .. half/2 - 1 (one per sin/cos pair).
    freqs = torch.exp(torch.arange(0, half, 2, dtype=torch.float64) * (-math.log(base) / half))
    cols = torch.arange(width, dtype=torch.float64)[:, None] * freqs  # (w, half/2)
    rows = torch.arange(height, dtype=torch.float64)[:, None] * freqs  # (h, half/2)
    enc = torch.zeros(height, width, dim, dtype=torch.float64)
    enc[:, :, 0:half:2] = torch.sin(cols)[None, :, :]
    enc[:, :, 1:half:2] = torch.cos(cols)[None, :, :]
    enc[:, :, half::2] = torch.sin(rows)[:, None, :]
    enc[:, :, half + 1 :: 2] = torch.cos(rows)[:, None, :]
    return enc.reshape(height * width, dim).to(dtype=dtype, device=device)


class PositionalEncoding2D(nn.Module):
    """Adds a fixed 2-D sinusoidal encoding to ``(B, h * w, d)`` token sequences.

    The table is a non-persistent buffer: it is deterministic, moves with ``.to()``, and is not
    written to checkpoints (RLR also keeps it outside the state dict).

    Args:
        dim: Token width ``d`` (multiple of 4).
        grid_size: ``(h, w)`` of the token grid.
        base: Frequency base.

    """

    encoding: Tensor  # the buffer registered in __init__ (nn.Module types unknown attributes Tensor | Module)

    def __init__(self, dim: int, grid_size: tuple[int, int], base: float = 1e4) -> None:
        super().__init__()
        self.dim = int(dim)
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.register_buffer(
            "encoding", sinusoidal_position_encoding_2d(*self.grid_size, self.dim, base), persistent=False
        )

    def forward(self, tokens: Tensor) -> Tensor:
        """Returns ``tokens + encoding`` (the encoding broadcasts over the batch)."""
        if tokens.shape[-2:] != self.encoding.shape:
            raise ValueError(f"Expected tokens (..., {self.encoding.shape[0]}, {self.dim}), got {tuple(tokens.shape)}.")
        return tokens + self.encoding.to(tokens.dtype)

    def extra_repr(self) -> str:
        """Summary shown in the module's ``repr``."""
        return f"dim={self.dim}, grid_size={self.grid_size}"
