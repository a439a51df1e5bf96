"""CCL's feature noise: masked Gaussian noise added in place to the projected clean-view maps.

Official (LGC-AD/AD-LGC ``model/lgc.py`` v1 / ``model/rd.py`` HEAD ``train_forward``): once per training
iteration ``torch.randn(1) > 0.5`` decides whether to perturb (probability :data:`NOISE_TRIGGER_PROB`, about
0.31); if so, every level gets ``noise * mask`` added with ``+=``, where the noise is ``N(0, 1)`` of the
feature's shape and the mask a per-sample, per-location Bernoulli(0.5) of shape (B, 1, H, W) shared by all
channels. The addition is in place, so the OCBE, the student and the dense contrastive term all see the
noisy maps; autograd treats it as the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NOISE_TRIGGER_PROB", "feature_noise_"]

#: P[N(0,1) > 0.5], the per-iteration probability that the official code perturbs the features (0.3085).
NOISE_TRIGGER_PROB: float = 0.5 * math.erfc(0.5 / math.sqrt(2.0))


def feature_noise_(
    features: list[Tensor], prob_apply: float | None = None, mask_prob: float = 0.5, std: float = 1.0
) -> bool:
    """Perturbs multi-level features in place with masked Gaussian noise (official CCL noise).

    Args:
        features: ``(B, C, H, W)`` outputs of non-in-place operations (e.g. the projection layers).
        prob_apply: ``None`` = the official rule (one ``N(0, 1)`` draw compared with 0.5); otherwise the
            probability of perturbing (one ``U(0, 1)`` draw ``< prob_apply``).
        mask_prob: Probability that a location is perturbed (official 0.5).
        std: Noise standard deviation (official 1).

    Returns:
        Whether the noise was applied. The draws follow the official order and generators: the decision
        and, at ``mask_prob=0.5``, the mask (``randint(0, 2)``) from the global CPU RNG, the noise from the
        feature's device RNG; so with the same seed both codes perturb identically.
    """
    # The official rule: one N(0, 1) draw compared with 0.5; otherwise one U(0, 1) draw.
    apply = torch.randn(1).item() > 0.5 if prob_apply is None else torch.rand(1).item() < prob_apply
    if not apply:
        return False
    for f in features:
        b, _, h, w = f.shape
        noise = torch.randn_like(f)
        if mask_prob == 0.5:
            mask = torch.randint(0, 2, (b, 1, h, w)).to(f.device, f.dtype)
        else:
            mask = (torch.rand((b, 1, h, w)) < mask_prob).to(f.device, f.dtype)
        f.add_(noise.mul_(std) * mask)
    return True
