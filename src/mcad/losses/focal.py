"""Focal loss on softmax probabilities with label smoothing (CRR stage II).

Paraphrase of `FocalLoss` in CRR's `utils.py` (Qiqigeww/CRR-MUAD @ cbd2a12; itself from
Hsuxu/Loss_ToolBox-PyTorch) as CRR calls it: the stage-II script applies softmax itself and builds
`FocalLoss()` with its defaults (gamma 2, no alpha, smooth 1e-5, mean). Per pixel, with the one-hot
target clamped to [smooth / (K - 1), 1 - smooth]:

    p_t = sum_k onehot_k * prob_k + smooth,      loss = -(1 - p_t)^gamma * log(p_t)

(note the `+ smooth` on p_t, which keeps the log finite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["focal_loss"]


def focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    smooth: float = 1e-5,
    alpha: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Focal loss of `logits` against integer class targets.

    Args:
        logits: `(B, K, ...)` unnormalised scores; softmax is taken over dim 1.
        target: `(B, ...)` or `(B, 1, ...)` class indices (a binary float mask works: it is cast to long).
        gamma: Focusing exponent.
        smooth: Label smoothing of the one-hot target and additive floor of p_t.
        alpha: Optional per-class weights `(K,)` (None = 1 for every class, as in CRR).
        reduction: `"mean"`, `"sum"` or `"none"` (per-pixel `(B, ...)`).

    Returns:
        Loss tensor.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError("focal_loss needs at least 2 classes (logits.shape[1] >= 2)")
    if target.dim() == logits.dim():
        target = target.squeeze(1)
    target = target.long()
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
    prob = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(target, num_classes).movedim(-1, 1).to(prob.dtype)
    if smooth:
        one_hot = one_hot.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (one_hot * prob).sum(dim=1) + smooth
    loss = -torch.pow(1.0 - pt, gamma) * torch.log(pt)
    if alpha is not None:
        loss = loss * alpha.to(loss)[target]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}")
