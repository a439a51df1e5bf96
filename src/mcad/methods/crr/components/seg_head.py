"""Convolutional segmentation head of CRR's stage II (`DecoderReconstructive`).

Paraphrase of `DecoderReconstructive` in CRR's `models/vision_transformer.py` and `weights_init` in
`dinomaly_realiad_uni_second.py` (Qiqigeww/CRR-MUAD @ cbd2a12). The head is DRAEM's reconstructive
decoder without skip connections: `num_stages` stages of

    upsample (bilinear, align_corners=True) -> conv3x3 + BN + ReLU          ("up")
    conv3x3 + BN + ReLU -> conv3x3 (halve the width) + BN + ReLU           ("db")

with widths base*2^(S-1), ..., base, then a final conv3x3 to the logits. Every stage but the last
doubles the resolution; the last resizes to `output_size` (256x256 in CRR, i.e. 28->56->112->224->256).
At the paper setting (input 1536 @ 28x28, base 192, 4 stages, 2 logits) it has 70,441,778 parameters
(E-CRR6: 70.4 M; ~548 GMACs per image at 256x256).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationHead"]


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class _Stage(nn.Module):
    def __init__(self, c_in: int, width: int, c_out: int, size: tuple[int, int] | None) -> None:
        super().__init__()
        self.size = size  # None: x2 upsampling; else resize to this size
        self.up = nn.Sequential(*_conv_bn_relu(c_in, width))
        self.db = nn.Sequential(*_conv_bn_relu(width, width), *_conv_bn_relu(width, c_out))

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        size = size or self.size
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.db(self.up(x))


class SegmentationHead(nn.Module):
    """Upsampling conv decoder from the seg-input tensor to per-pixel logits.

    Args:
        in_channels: Input width (1536 = 2 groups x 768 in CRR). The official first conv maps
            `base_width * 2^(num_stages-1)` channels; any input width is accepted here.
        base_width: Width of the last stage (192 in CRR); stage i has `base_width * 2^(S-1-i)` channels.
        out_channels: Number of logits (2 in CRR: normal / anomalous, read through a softmax).
        num_stages: Number of upsampling stages (4 in CRR).
        output_size: Size the last stage resizes to; None makes the last stage upsample x2 as well.
            Can be overridden per call.
        final_width: Width before the logits conv (48 in CRR).
        zero_conv_bias: Zero the convolution biases at init. False is faithful: the official
            `weights_init` only re-draws conv weights, N(0, 0.02), and BN weights, N(1, 0.02), with BN bias 0,
            leaving conv biases at PyTorch's default uniform init (E-CRR5).

    Shapes:
        `(B, in_channels, h, w) -> (B, out_channels, *output_size)`.
    """

    def __init__(
        self,
        in_channels: int = 1536,
        base_width: int = 192,
        out_channels: int = 2,
        num_stages: int = 4,
        output_size: Sequence[int] | None = (256, 256),
        final_width: int = 48,
        zero_conv_bias: bool = False,
    ) -> None:
        super().__init__()
        if num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {num_stages}")
        self.output_size = None if output_size is None else (int(output_size[0]), int(output_size[1]))
        widths = [base_width * 2 ** (num_stages - 1 - i) for i in range(num_stages)]
        outs = [*widths[1:], final_width]
        c_in = in_channels
        stages = []
        for i, (width, c_out) in enumerate(zip(widths, outs)):
            last = i == num_stages - 1
            stages.append(_Stage(c_in, width, c_out, self.output_size if last else None))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.final = nn.Conv2d(final_width, out_channels, kernel_size=3, padding=1)
        self.reset_parameters(zero_conv_bias)

    def reset_parameters(self, zero_conv_bias: bool = False) -> None:
        """CRR stage-II init: conv weights N(0, 0.02); BN weight N(1, 0.02), BN bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if zero_conv_bias and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """Logits for the seg-input tensor `x`; `output_size` overrides the constructor's size."""
        size = None if output_size is None else (int(output_size[0]), int(output_size[1]))
        for i, stage in enumerate(self.stages):
            x = stage(x, size if i == len(self.stages) - 1 else None)
        return self.final(x)
