"""ResNet-style blocks of Reverse Distillation: the OCBE bottleneck and the de-ResNet decoder.

Widths are derived from the teacher's three feature widths ``(c1, c2, c3)`` so that the same blocks
fit WideResNet-50-2 (256, 512, 1024 -> exactly RD4AD's modules) and small CNNs such as
EfficientNet-Lite0 (24, 40, 112).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _deconv2x2(cin: int, cout: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1×1 -> 3×3 -> 1×1, expansion 4); inner width ``planes * base_width / 64``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * base_width / 64)
        out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class DeBottleneck(nn.Module):
    """RD4AD's decoder bottleneck.

    The stride-2 3×3 conv becomes a 2×2 transposed conv (upsampling), and so does the shortcut (as in
    RD4AD ``de_resnet.py``).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * base_width / 64)
        out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(inplanes, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = _deconv2x2(width, width) if stride == 2 else _conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, out, 1, bias=False), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.upsample = None
        if stride != 1 or inplanes != out:
            shortcut = _deconv2x2(inplanes, out) if stride == 2 else nn.Conv2d(inplanes, out, 1, bias=False)
            self.upsample = nn.Sequential(shortcut, nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.upsample is None else self.upsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal for regular convs, BN (1, 0).

    Transposed convs keep PyTorch's default init (RD4AD initialises only ``nn.Conv2d``; errata E-RD2).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_channels(channels: Sequence[int]) -> tuple[int, int, int]:
    """Checks the teacher widths at build time; the errors name what the backbone gives and what is needed."""
    channels = [int(c) for c in channels]
    if len(channels) != 3:
        raise ValueError(
            f"Backbone/decoder mismatch: the backbone gives {len(channels)} feature levels with widths {channels}, "
            "but the OCBE and de-ResNet decoder of reverse distillation need 3 levels (c1, c2, c3), e.g. "
            "[256, 512, 1024] for WideResNet-50-2. Select three stages with backbone.out_indices (e.g. [1, 2, 3])."
        )
    bad = [c for c in channels if c % 4]
    if bad:
        raise ValueError(
            f"Backbone/decoder mismatch: the backbone widths {channels} must be multiples of 4 for the de-ResNet "
            f"decoder, whose bottlenecks output 4 x planes channels; {bad} cannot be reproduced. Choose other "
            "backbone.out_indices or another backbone."
        )
    return channels[0], channels[1], channels[2]


class OCBE(nn.Module):
    """One-class bottleneck embedding (RD4AD ``BN_layer``; ADer ``MFF_OCE``).

    Multi-scale fusion (levels 1 and 2 strided down to level 3's grid, concatenated with level 3),
    then one ResNet stage of ``num_blocks`` bottlenecks (stride 2) -> ``2·c3`` channels at half of
    level 3's resolution.

    Args:
        channels: Teacher widths ``(c1, c2, c3)``.
        base_width: Bottleneck base width: 128 = RD4AD original (wide), 64 = ADer/CCL.
        num_blocks: Bottlenecks in the embedding stage (3).
    """

    def __init__(self, channels: Sequence[int], base_width: int = 64, num_blocks: int = 3) -> None:
        super().__init__()
        c1, c2, c3 = _check_channels(channels)
        self.conv1, self.bn1 = _conv3x3(c1, c2, 2), nn.BatchNorm2d(c2)
        self.conv2, self.bn2 = _conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
        self.conv3, self.bn3 = _conv3x3(c2, c3, 2), nn.BatchNorm2d(c3)
        self.relu = nn.ReLU(inplace=True)
        planes = c3 // 2
        blocks = [Bottleneck(3 * c3, planes, stride=2, base_width=base_width)]
        blocks += [Bottleneck(planes * 4, planes, base_width=base_width) for _ in range(num_blocks - 1)]
        self.embed = nn.Sequential(*blocks)
        self.out_channels = planes * 4
        _init_weights(self)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """``[f1, f2, f3]`` -> embedding ``(B, 2·c3, h3 / 2, w3 / 2)``."""
        l1 = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(features[0]))))))
        l2 = self.relu(self.bn3(self.conv3(features[1])))
        return self.embed(torch.cat([l1, l2, features[2]], dim=1)).contiguous()


class DeResNetDecoder(nn.Module):
    """The student decoder (RD4AD ``de_wide_resnet50_2``).

    Three up-sampling stages that mirror the teacher, returning maps with the teacher's widths and
    resolutions, ordered shallow to deep.

    Args:
        in_channels: Width of the embedding (``OCBE.out_channels``).
        channels: Teacher widths ``(c1, c2, c3)``.
        layers: Blocks per stage, deep to shallow (WRN50: 3, 4, 6).
        base_width: Bottleneck base width (``width_per_group``: 128 for the wide decoder).
    """

    def __init__(
        self, in_channels: int, channels: Sequence[int], layers: Sequence[int] = (3, 4, 6), base_width: int = 128
    ) -> None:
        super().__init__()
        c1, c2, c3 = _check_channels(channels)
        if len(layers) != 3:
            raise ValueError(f"decoder.layers must have 3 entries, got {list(layers)}.")
        stages = []
        inplanes = in_channels
        for planes, blocks in zip((c3 // 4, c2 // 4, c1 // 4), layers):
            stage = [DeBottleneck(inplanes, planes, stride=2, base_width=base_width)]
            inplanes = planes * 4
            stage += [DeBottleneck(inplanes, planes, base_width=base_width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.ModuleList(stages)
        _init_weights(self)

    def forward(self, embedding: Tensor) -> list[Tensor]:
        """Embedding -> ``[s1, s2, s3]`` matching the teacher's ``[f1, f2, f3]``."""
        outs = []
        x = embedding
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs[::-1]
