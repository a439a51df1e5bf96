"""Cosine-distance losses and maps shared by the reconstruction methods."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def global_cosine_loss(targets: Sequence[Tensor], preds: Sequence[Tensor]) -> Tensor:
    """Reverse distillation's loss: per level ``mean_batch[1 - cos(vec(T), vec(S))]``, summed.

    ``vec`` flattens the whole ``C×H×W`` map of a sample, so this is one cosine per image and level,
    not a per-pixel cosine (RD4AD ``main.py::loss_fucntion``; ADer ``CosLoss(avg=False)``).
    """
    total = targets[0].new_zeros(())
    for t, s in zip(targets, preds):
        total = total + (1.0 - F.cosine_similarity(t.flatten(1), s.flatten(1), dim=1)).mean()
    return total


def cosine_distance_map(target: Tensor, pred: Tensor) -> Tensor:
    """Per-pixel ``1 - cos`` over channels: ``(B, C, h, w)`` pair -> ``(B, 1, h, w)``."""
    return (1.0 - F.cosine_similarity(target, pred, dim=1)).unsqueeze(1)


class GlobalCosineLoss(nn.Module):
    """Module form of :func:`global_cosine_loss` (the ``loss=global_cosine`` config)."""

    def forward(self, targets: Sequence[Tensor], preds: Sequence[Tensor]) -> Tensor:
        return global_cosine_loss(targets, preds)
