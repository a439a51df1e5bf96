"""Attention blocks on token grids.

Contents:

* :func:`local_window_mask` / :func:`complement_window_mask`: boolean ``(L, L)`` masks of a
  ``h x w`` token grid (``True`` = the query may attend to that key), in the convention of
  :func:`torch.nn.functional.scaled_dot_product_attention`.
* :class:`MultiHeadAttention`: multi-head attention with separate query/key/value inputs, an optional
  boolean mask, keys/values that may be shared by the whole batch (batch size 1), and a safe
  treatment of queries whose mask row is empty.
* :class:`LocalCrossAttention` (RLR's LCA) and :class:`MaskedLearnableKeyAttention` (RLR's MLKA).

Token order is row-major: token ``r * w + c`` is grid cell ``(r, c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(k: int | tuple[int, int]) -> tuple[int, int]:
    return (int(k), int(k)) if isinstance(k, int) else (int(k[0]), int(k[1]))


def local_window_mask(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Boolean mask letting each grid position attend to its ``k x k`` neighbourhood.

    Query ``p = (r_p, c_p)`` may attend to key ``q = (r_q, c_q)`` iff
    ``|r_p - r_q| <= k_h // 2`` and ``|c_p - c_q| <= k_w // 2``: the window is centred on ``p``,
    contains ``p`` itself, and is clipped at the grid borders (not shifted), as the window of RLR's
    ``models/model.py::EncoderLayer.generate_mask``.

    Args:
        height: Grid rows ``h``.
        width: Grid columns ``w``.
        window_size: Odd window side ``k`` or ``(k_h, k_w)``.
        device: Device of the returned mask.

    Returns:
        A ``(h * w, h * w)`` bool tensor, ``True`` where the query (row) may attend to the key (column).

    Raises:
        ValueError: The window side is not a positive odd number (an even side has no centre; the
            official code would silently use ``k + 1``).

    """
    kh, kw = _pair(window_size)
    if kh <= 0 or kw <= 0 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"Window sides must be positive and odd, got {(kh, kw)}.")
    rows = torch.arange(height, device=device).repeat_interleave(width)  # row of each token
    cols = torch.arange(width, device=device).repeat(height)  # column of each token
    near_rows = (rows[:, None] - rows[None, :]).abs() <= kh // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= kw // 2
    return near_rows & near_cols


def complement_window_mask(
    height: int,
    width: int,
    window_size: int | tuple[int, int],
    device: torch.device | str | None = None,
) -> Tensor:
    """Complement of :func:`local_window_mask`: each position attends to everything *outside* its window.

    The query's own position is excluded too (it lies inside its window). This is the mask of RLR's
    MLKA (code name ``nsa``).

    Args:
        height: Grid rows ``h``.
        width: Grid columns ``w``.
        window_size: Odd window side ``k`` or ``(k_h, k_w)``.
        device: Device of the returned mask.

    Returns:
        A ``(h * w, h * w)`` bool tensor, ``True`` where attention is allowed.

    """
    return ~local_window_mask(height, width, window_size, device=device)


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention with a boolean mask.

    Parameters are laid out as in :class:`torch.nn.MultiheadAttention` (packed ``in_proj_weight``
    ``(3d, d)``, ``in_proj_bias`` and ``out_proj``) and initialised the same way (Xavier-uniform
    input projections, zero biases), so parameter counts and initial statistics match RLR, which
    uses ``nn.MultiheadAttention`` (``models/model.py``), and its checkpoints map by key renaming.

    Differences from ``nn.MultiheadAttention``: the mask is boolean with ``True`` = *may attend*
    (the convention of :func:`~torch.nn.functional.scaled_dot_product_attention`); keys/values with
    batch size 1 are broadcast over the queries' batch (a learnable reference shared by all images
    is projected once, not once per image); a query whose mask row is all ``False`` gets a zero
    attention output (so the block returns just the output-projection bias) instead of NaN.

    Args:
        dim: Token width ``d`` (queries, keys and values all have width ``d``).
        num_heads: Number of heads; must divide ``d``.
        dropout: Dropout on the attention weights during training (RLR uses 0).
        bias: Use biases in the projections.

    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialises like ``nn.MultiheadAttention._reset_parameters``."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor, part: int) -> Tensor:
        """Projects ``x`` with the ``part``-th slice (0 = q, 1 = k, 2 = v) and splits the heads."""
        d = self.dim
        weight = self.in_proj_weight[part * d : (part + 1) * d]
        bias = None if self.in_proj_bias is None else self.in_proj_bias[part * d : (part + 1) * d]
        b, n, _ = x.shape
        return F.linear(x, weight, bias).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Attends ``query`` to ``key``/``value``.

        Args:
            query: ``(B, L_q, d)``.
            key: ``(B, L_k, d)`` or ``(1, L_k, d)`` (shared by the batch).
            value: ``(B, L_k, d)`` or ``(1, L_k, d)``.
            attn_mask: Optional bool ``(L_q, L_k)`` mask, ``True`` = may attend.

        Returns:
            ``(B, L_q, d)``.

        """
        batch = query.shape[0]
        q = self._heads(query, 0)
        # Project shared (batch-1) keys/values once and broadcast them as a view.
        k = self._heads(key, 1).expand(batch, -1, -1, -1)
        v = self._heads(value, 2).expand(batch, -1, -1, -1)
        empty_rows = None
        if attn_mask is not None:
            if attn_mask.dtype != torch.bool:
                raise TypeError(f"attn_mask must be boolean (True = may attend), got {attn_mask.dtype}.")
            # An all-False row makes softmax 0/0 = NaN (also in the backward pass). Let such rows attend
            # everywhere, then zero their output: "a weighted sum over no keys is 0". Done
            # unconditionally (no data-dependent branch, hence no host-device sync per call).
            empty_rows = ~attn_mask.any(dim=-1)
            attn_mask = attn_mask | empty_rows[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        if empty_rows is not None:
            out = out.masked_fill(empty_rows[:, None], 0.0)
        out = out.transpose(1, 2).reshape(batch, query.shape[1], self.dim)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        """Summary shown in the module's ``repr``."""
        return f"dim={self.dim}, num_heads={self.num_heads}, dropout={self.dropout}"


class LocalCrossAttention(nn.Module):
    """RLR's Local Cross Attention (LCA, code name ``mca``): queries read the reference only.

    ``out = MHA(query = x, key = value = reference)`` under a local-window mask
    (:func:`local_window_mask`), so each position's output is a combination of the reference tokens
    inside its ``k x k`` neighbourhood and carries no information from the input tokens' values.

    Args:
        dim: Token width ``d``.
        num_heads: Number of heads.
        dropout: Attention-weight dropout.

    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout)

    def forward(self, x: Tensor, reference: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Returns the LCA output.

        Args:
            x: Query tokens ``(B, L, d)``.
            reference: Embedded reference tokens ``(1 or B, L_r, d)``; keys and values.
            attn_mask: Bool ``(L, L_r)`` mask (``True`` = may attend), normally
                :func:`local_window_mask`; ``None`` gives global cross attention (RLR's ``ca``).

        Returns:
            ``(B, L, d)``.

        """
        return self.attn(x, reference, reference, attn_mask)


class MaskedLearnableKeyAttention(nn.Module):
    """RLR's Masked Learnable-Key Attention (MLKA, code name ``nsa``).

    ``out = MHA(query = x, key = reference, value = x)`` under the complement of the local window
    (:func:`complement_window_mask`): the attention weights come from query/learnable-key similarity
    and the output mixes the *other* positions' input tokens, never a position's own neighbourhood
    (which would let the model copy an anomalous input through).

    Args:
        dim: Token width ``d``.
        num_heads: Number of heads.
        dropout: Attention-weight dropout.

    """

    def __init__(self, dim: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, num_heads, dropout)

    def forward(self, x: Tensor, keys: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """Returns the MLKA output.

        Args:
            x: Query and value tokens ``(B, L, d)``.
            keys: Learnable keys ``(1 or B, L, d)`` (RLR: the embedded reference).
            attn_mask: Bool ``(L, L)`` mask (``True`` = may attend), normally
                :func:`complement_window_mask`.

        Returns:
            ``(B, L, d)``.

        """
        return self.attn(x, keys, x, attn_mask)
