"""RD++-style projection layers used by CCL (class-aware contrastive learning).

CCL (docs/methods.md) inserts one trainable projection block per teacher level between the frozen
teacher and the OCBE ("MFF_OCE"); the dense contrastive loss and the feature noise act on these projected
maps. The block is taken from RD++: a channel bottleneck C → C/2 → C/4 → C/2 → C of 3×3 convolutions (with
bias), each followed by ``InstanceNorm2d`` (no affine parameters, no running statistics) and ``LeakyReLU``
(slope 0.01), including after the last convolution, so the projected features are non-negative-ish and
instance-normalised rather than on the teacher's scale.

Reference: LGC-AD/AD-LGC ``model/lgc.py::ProjLayer`` / ``MultiProjectionLayer`` (v1, 204b215) and
``model/rd.py`` (HEAD, 6502f68; adds the depthwise-separable ``SparseProjLayer`` behind ``dp=True``).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ProjLayer", "MultiProjectionLayer", "projection_param_count"]


def _conv_block(in_channels: int, out_channels: int, separable: bool) -> list[nn.Module]:
    """One conv → InstanceNorm2d → LeakyReLU stage (conv is either dense 3×3 or depthwise 3×3 + pointwise)."""
    if separable:
        # HEAD `SparseProjLayer`: depthwise 3x3 then pointwise 1x1, both with bias (PyTorch default).
        convs: list[nn.Module] = [
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, groups=in_channels),
            nn.Conv2d(in_channels, out_channels, kernel_size=1),
        ]
    else:
        convs = [nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=True)]
    # InstanceNorm2d defaults (affine=False, track_running_stats=False) and LeakyReLU defaults (0.01,
    # not in-place) as in the official code. Not in-place matters: CCL adds noise to the block's output in
    # place (see `mcad.losses.ccl.feature_noise_`), which is only autograd-safe if the activation does not
    # need its own output for the backward pass.
    return [*convs, nn.InstanceNorm2d(out_channels), nn.LeakyReLU()]


def _widths(in_channels: int, out_channels: int, width_multiplier: int) -> list[int]:
    m = width_multiplier
    return [in_channels, m * in_channels // 2, m * in_channels // 4, m * in_channels // 2, out_channels]


class ProjLayer(nn.Module):
    """RD++ projection block: 3×3 convs C → C/2 → C/4 → C/2 → C_out, each + InstanceNorm2d + LeakyReLU.

    Spatial size is preserved (stride 1, padding 1).

    Args:
        in_channels: Input channels C (must be divisible by 4).
        out_channels: Output channels; defaults to ``in_channels`` (the only configuration CCL uses).
        separable: Use the depthwise-separable variant of the later official code (``dp=True`` there;
            default ``False`` = the variant used for the reported results).
        width_multiplier: Scales the three hidden widths (``m·C/2, m·C/4, m·C/2``). 1 = official. A
            narrow backbone (Lite0: 24 / 40 / 112 channels against WRN50-2's 256 / 512 / 1024) would
            otherwise squeeze its shallowest level through 6 channels.
    """

    def __init__(
        self, in_channels: int, out_channels: int | None = None, separable: bool = False, width_multiplier: int = 1
    ) -> None:
        super().__init__()
        if in_channels % 4 != 0:
            raise ValueError(f"in_channels must be divisible by 4, got {in_channels}")
        if int(width_multiplier) != width_multiplier or width_multiplier < 1:
            raise ValueError(f"width_multiplier must be a positive integer, got {width_multiplier}")
        out_channels = in_channels if out_channels is None else out_channels
        widths = _widths(in_channels, out_channels, int(width_multiplier))
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers.extend(_conv_block(c_in, c_out, separable))
        self.proj = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        """Project a (B, C, H, W) map to (B, C_out, H, W)."""
        return self.proj(x)


class MultiProjectionLayer(nn.Module):
    """One independent :class:`ProjLayer` per feature level.

    Args:
        channels: Channels of each level, e.g. ``[256, 512, 1024]`` for WRN50-2 stages 1–3 (the official
            ``MultiProjectionLayer(base=64)``).
        separable: Depthwise-separable variant (see :class:`ProjLayer`).
        width_multiplier: Hidden-width multiplier (see :class:`ProjLayer`; 1 = official).
    """

    def __init__(self, channels: Sequence[int], separable: bool = False, width_multiplier: int = 1) -> None:
        super().__init__()
        if len(channels) == 0:
            raise ValueError("channels must be non-empty")
        self.channels = [int(c) for c in channels]
        self.layers = nn.ModuleList(
            ProjLayer(c, c, separable=separable, width_multiplier=width_multiplier) for c in self.channels
        )

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Project every level; returns a new list (level order kept)."""
        if len(features) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} feature levels, got {len(features)}")
        return [layer(f) for layer, f in zip(self.layers, features)]


def projection_param_count(channels: Sequence[int], separable: bool = False, width_multiplier: int = 1) -> int:
    """Closed-form number of parameters of :class:`MultiProjectionLayer` (for checks and reports).

    For the dense variant each level has ``9·C²·(1/2 + 1/8 + 1/8 + 1/2) + (C/2 + C/4 + C/2 + C)``
    parameters (weights + biases; InstanceNorm has none), i.e. 15,486,912 for ``[256, 512, 1024]``.
    """
    total = 0
    for c in channels:
        widths = _widths(c, c, width_multiplier)
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            if separable:
                total += (9 * c_in + c_in) + (c_in * c_out + c_out)
            else:
                total += 9 * c_in * c_out + c_out
    return total
