"""Noisy bottleneck with feature-level random masking (CRR's `bMlp6`).

Paraphrase of `bMlp6` in CRR's `models/vision_transformer.py` (Qiqigeww/CRR-MUAD @ cbd2a12): the fused
encoder tokens are multiplied element-wise (token x channel) by a Bernoulli keep-mask, then pass
Dropout -> Linear -> GELU -> Dropout -> Linear -> Dropout. The keep-mask is NOT rescaled by 1/(1 - ratio)
(unlike dropout), so the MLP always sees about (1 - ratio) * x - and, in the official code, it is drawn in
eval mode too (ambiguity A-CRR2, erratum E-CRR1).

The random mask consumes random numbers exactly like `bMlp6` (`mask_rng="cpu"`, the default): one
`torch.rand((B, N, C))` from the CPU default generator, moved to the input's device, and an element is
zeroed where the draw is `> 1 - ratio`. With the same global seed the two codes therefore draw identical
masks (e.g. at test time with `mask_at_test=True`). `mask_rng="device"` draws on the input's device
instead (no host-to-device copy of a `B x N x C` tensor per forward; same distribution, other draws).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["MASK_RNGS", "NoisyBottleneck"]

MASK_RNGS = ("cpu", "device")


class NoisyBottleneck(nn.Module):
    """Element-wise random feature masking followed by a dropout-noised MLP.

    Args:
        dim: Input width C.
        hidden_dim: MLP hidden width; `4 * dim` when None.
        out_dim: Output width; `dim` when None.
        mask_ratio: Probability that an element is zeroed (0.4 in CRR, `lambda_mgd`).
        dropout: Dropout probability used at all three dropout sites (0.2 for MVTec/VisA in
            Dinomaly, 0.4 in CRR's Real-IAD scripts).
        mask_at_test: What happens to the mask in eval mode. False (default, deterministic): multiply by
            the keep probability `1 - mask_ratio`, i.e. the mask's expectation, so test inputs have the
            scale the MLP was trained on (E-CRR1). True: draw a random mask in eval mode as well - the
            official behaviour, which makes test scores random (fix the seed then).
        mask_rng: Where the mask's uniform draws come from: `"cpu"` (default; the CPU default generator,
            exactly as the official `bMlp6`, so equal seeds give equal masks) or `"device"` (the input's
            device generator; faster on a GPU, different draws).

    Shapes:
        `(B, N, C) -> (B, N, out_dim)`; any leading shape works.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        mask_ratio: float = 0.4,
        dropout: float = 0.2,
        mask_at_test: bool = False,
        mask_rng: Literal["cpu", "device"] = "cpu",
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        if mask_rng not in MASK_RNGS:
            raise ValueError(f"mask_rng must be one of {MASK_RNGS}, got {mask_rng!r}")
        self.mask_rng = mask_rng
        hidden_dim = hidden_dim or 4 * dim
        out_dim = out_dim or dim
        self.mask_ratio = float(mask_ratio)
        self.mask_at_test = bool(mask_at_test)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.drop = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        """Shown in `repr(module)`."""
        return f"mask_ratio={self.mask_ratio}, mask_at_test={self.mask_at_test}, mask_rng={self.mask_rng}"

    def mask_features(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the feature mask alone (random in training or with `mask_at_test`, else expectation)."""
        if self.mask_ratio == 0.0:
            return x
        if self.training or self.mask_at_test:
            # "cpu": bMlp6 draws from the CPU generator and moves the draw to the input's device.
            device = None if self.mask_rng == "cpu" else x.device
            u = torch.rand(x.shape, device=device).to(x.device)
            # bMlp6 zeroes where u > 1 - ratio (a float32 comparison with the Python scalar).
            keep = ~(u > 1.0 - self.mask_ratio)
            return x * keep.to(x.dtype)
        return x * (1.0 - self.mask_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mask, then the noisy MLP."""
        x = self.drop(self.mask_features(x))
        x = self.drop(self.act(self.fc1(x)))
        return self.drop(self.fc2(x))
