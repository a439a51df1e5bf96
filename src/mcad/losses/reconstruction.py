"""Feature-reconstruction losses and anomaly scores.

RLR (``trainer.py::train`` / ``test_separate``; docs/methods.md) trains each level with
``MSE(x_hat, x) + mean_tokens(1 - cos_C(x_hat, x))`` and scores each token with
``mean_C((x - x_hat)^2) + 1 - cos_C(x, x_hat)``: the same two terms, once averaged over everything and
once kept per token.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

#: ``eps`` of ``nn.CosineSimilarity``'s default, as used by RLR.
COSINE_EPS = 1e-8


def _channel_dim(x: Tensor, channel_dim: int | None) -> int:
    if channel_dim is not None:
        return channel_dim
    if x.ndim == 4:
        return 1  # maps (B, C, h, w)
    if x.ndim == 3:
        return -1  # tokens (B, L, C)
    raise ValueError(f"Expected maps (B, C, h, w) or tokens (B, L, C), got shape {tuple(x.shape)}.")


def mse_cosine_loss(pred: Tensor, target: Tensor, channel_dim: int | None = None) -> Tensor:
    """RLR's per-level training loss ``MSE(pred, target) + mean(1 - cos_C(pred, target))``.

    Args:
        pred: Reconstruction, maps ``(B, C, h, w)`` or tokens ``(B, L, C)``.
        target: Clean features, same shape.
        channel_dim: Channel dimension; default ``1`` for 4-D and ``-1`` for 3-D inputs.

    Returns:
        A scalar: element-mean squared error plus the token-mean cosine distance.

    """
    if pred.shape != target.shape:
        raise ValueError(f"Shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    cdim = _channel_dim(pred, channel_dim)
    cos = F.cosine_similarity(pred, target, dim=cdim, eps=COSINE_EPS)
    return F.mse_loss(pred, target) + (1.0 - cos).mean()


def mse_cosine_score(pred: Tensor, target: Tensor, channel_dim: int | None = None) -> Tensor:
    """RLR's per-token anomaly score ``mean_C((target - pred)^2) + 1 - cos_C(target, pred)``.

    Args:
        pred: Reconstruction, maps ``(B, C, h, w)`` or tokens ``(B, L, C)``.
        target: Features, same shape.
        channel_dim: Channel dimension; default ``1`` for 4-D and ``-1`` for 3-D inputs.

    Returns:
        The score with the channel dimension removed: ``(B, h, w)`` for maps, ``(B, L)`` for tokens.

    """
    if pred.shape != target.shape:
        raise ValueError(f"Shape mismatch: {tuple(pred.shape)} vs {tuple(target.shape)}.")
    cdim = _channel_dim(pred, channel_dim)
    sq = (target - pred).pow(2).mean(dim=cdim)
    return sq + 1.0 - F.cosine_similarity(target, pred, dim=cdim, eps=COSINE_EPS)
