"""Loose global cosine loss with percentile hard mining (Dinomaly / CRR stage I).

Paraphrase of `global_cosine_hm_percent` and `modify_grad` in CRR's `utils.py` (Qiqigeww/CRR-MUAD
@ cbd2a12, same in guojiajeremy/Dinomaly) and the schedule in `dinomaly_realiad_uni_first.py`.

For each (encoder, decoder) group pair the loss VALUE is the plain global cosine distance between the
whole flattened maps, averaged over the batch. Hard mining only touches the GRADIENT: a hook on the
decoder map multiplies by `factor` the gradient at the spatial positions whose point-wise cosine distance
is below the k-th largest one, k = int((1 - p) * #positions) - i.e. the easiest ~p fraction of positions
(over the whole batch) learn 10x slower, so optimisation concentrates on the poorly reconstructed ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["global_cosine", "global_cosine_hard_mining", "hard_mining_p"]


def hard_mining_p(step: int, p_final: float = 0.9, ramp_iters: int = 1000) -> float:
    """Hard-mining fraction at `step`: `min(p_final, p_final * step / ramp_iters)` (0 -> 0.9 over 1k it)."""
    if ramp_iters <= 0:
        return p_final
    return min(p_final, p_final * step / ramp_iters)


def global_cosine(enc_groups: Sequence[torch.Tensor], dec_groups: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over groups of mean_batch[1 - cos(vec(E), vec(D))], with E detached (no hard mining)."""
    _check(enc_groups, dec_groups)
    loss = enc_groups[0].new_zeros(())
    for e, d in zip(enc_groups, dec_groups):
        loss = loss + (1.0 - F.cosine_similarity(e.detach().flatten(1), d.flatten(1), dim=1)).mean()
    return loss / len(enc_groups)


def global_cosine_hard_mining(
    enc_groups: Sequence[torch.Tensor],
    dec_groups: Sequence[torch.Tensor],
    p: float,
    factor: float = 0.1,
) -> torch.Tensor:
    """Global cosine loss whose gradient is damped at the easiest `p` fraction of positions.

    The returned value equals `global_cosine(enc_groups, dec_groups)`. As a side effect a gradient hook is
    registered on every decoder map that requires grad; it fires once per backward through that tensor.
    (Calling this twice on the same decoder tensor stacks two hooks, as in the official code.)

    Args:
        enc_groups: Encoder group maps `(B, C, h, w)`; treated as constants (detached).
        dec_groups: Decoder group maps of the same shapes.
        p: Fraction of positions whose gradient is scaled; use `hard_mining_p(step)`.
        factor: Gradient multiplier for the easy positions (0.1 in CRR).

    Returns:
        Scalar loss.
    """
    _check(enc_groups, dec_groups)
    loss = enc_groups[0].new_zeros(())
    for e, d in zip(enc_groups, dec_groups):
        e = e.detach()
        loss = loss + (1.0 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean()
        if not d.requires_grad:
            continue
        with torch.no_grad():
            point_dist = 1.0 - F.cosine_similarity(e, d, dim=1).unsqueeze(1)  # (B, 1, h, w)
            flat = point_dist.flatten()
            # k-th largest distance, k = int(N (1 - p)); at least 1 so that p = 1 still works.
            k = min(max(int(flat.numel() * (1.0 - p)), 1), flat.numel())
            thresh = torch.topk(flat, k=k).values[-1]
            scale = torch.where(point_dist < thresh, factor, 1.0).to(d.dtype)  # broadcast over channels
        d.register_hook(lambda grad, scale=scale: grad * scale)
    return loss / len(enc_groups)


def _check(enc_groups: Sequence[torch.Tensor], dec_groups: Sequence[torch.Tensor]) -> None:
    if len(enc_groups) == 0 or len(enc_groups) != len(dec_groups):
        raise ValueError(f"need the same non-zero number of groups, got {len(enc_groups)} and {len(dec_groups)}")
    for i, (e, d) in enumerate(zip(enc_groups, dec_groups)):
        if e.shape != d.shape:
            raise ValueError(f"group {i}: encoder shape {tuple(e.shape)} != decoder shape {tuple(d.shape)}")
