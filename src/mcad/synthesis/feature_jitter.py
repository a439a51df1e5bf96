"""UniAD-style feature jitter (``synthesizer=feature_jitter``; a feature-level synthesizer).

Each token ``x`` (a vector over the channel dimension of size ``C``) is perturbed as
``x + eps * (||x||_2 / C) * scale`` with ``eps ~ N(0, I_C)``, for a random fraction ``prob`` of the
tokens of every sample (RLR ``trainer.py::add_jitter``; RLR's README trains with ``scale = 4`` and
``prob = 1``). The noise magnitude is relative to each token's norm, so it adapts to the very
different scales of backbone levels. The noise is a constant w.r.t. autograd (the norm is taken on
detached values): jitter perturbs the input, it is not part of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _default_channel_dim(x: Tensor) -> int:
    if x.ndim == 3:
        return -1  # tokens (B, L, C)
    if x.ndim == 4:
        return 1  # maps (B, C, h, w)
    raise ValueError(f"Expected tokens (B, L, C) or maps (B, C, h, w), got shape {tuple(x.shape)}.")


def feature_jitter(
    tokens_or_maps: Tensor,
    scale: float = 4.0,
    prob: float = 1.0,
    generator: torch.Generator | None = None,
    channel_dim: int | None = None,
) -> Tensor:
    """Adds norm-relative Gaussian jitter to a random fraction of tokens.

    Args:
        tokens_or_maps: Tokens ``(B, L, C)`` or feature maps ``(B, C, h, w)``.
        scale: Noise scale ``s`` (RLR README: 4; 0 disables the jitter).
        prob: Fraction of tokens of each sample that are jittered. As in RLR, exactly
            ``int((1 - prob) * L)`` tokens per sample, drawn uniformly without replacement, stay clean.
        generator: Optional RNG for reproducible noise; its device is used for sampling and the
            samples are moved to the input's device.
        channel_dim: Channel dimension; default ``-1`` for 3-D tokens and ``1`` for 4-D maps.

    Returns:
        The jittered tensor (same shape and dtype). With ``scale == 0`` or ``prob <= 0`` the input is
        returned unchanged (the same tensor object).

    """
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}.")
    if scale == 0 or prob <= 0:
        return tokens_or_maps
    cdim = _default_channel_dim(tokens_or_maps) if channel_dim is None else channel_dim
    x = tokens_or_maps.movedim(cdim, -1)  # (B, *spatial, C)
    batch, channels = x.shape[0], x.shape[-1]
    num_tokens = x[0, ..., 0].numel()
    sample_device = generator.device if generator is not None else x.device
    norms = x.detach().float().norm(dim=-1, keepdim=True) / channels
    noise = torch.randn(x.shape, generator=generator, device=sample_device).to(x.device)
    noise = noise * norms * scale
    num_clean = int((1.0 - prob) * num_tokens)
    if num_clean > 0:
        order = torch.rand(batch, num_tokens, generator=generator, device=sample_device).argsort(dim=1)
        keep = torch.ones(batch, num_tokens, device=sample_device)
        keep.scatter_(1, order[:, :num_clean], 0.0)
        noise = noise * keep.to(x.device).view(batch, *x.shape[1:-1], 1)
    return (x + noise.to(x.dtype)).movedim(-1, cdim)


class FeatureJitter(nn.Module):
    """Feature-level synthesizer applying :func:`feature_jitter` to every level.

    Attributes:
        level: ``"feature"`` (the framework applies it to backbone features, not to images).

    Args:
        scale: Noise scale ``s``.
        prob: Fraction of jittered tokens per sample.
        generator: Optional RNG for reproducible noise.

    """

    level = "feature"

    def __init__(self, scale: float = 4.0, prob: float = 1.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.scale = float(scale)
        self.prob = float(prob)
        self.generator = generator

    def forward(self, features: Sequence[Tensor] | Tensor) -> list[Tensor] | Tensor:
        """Jitters each feature map (or token tensor) independently.

        Args:
            features: A list of ``(B, C, h, w)`` maps / ``(B, L, C)`` tokens, or one tensor.

        Returns:
            The jittered features, in the same structure.

        """
        if isinstance(features, Tensor):
            return feature_jitter(features, self.scale, self.prob, self.generator)
        return [feature_jitter(f, self.scale, self.prob, self.generator) for f in features]

    def extra_repr(self) -> str:
        """Summary shown in the module's ``repr``."""
        return f"scale={self.scale}, prob={self.prob}"
