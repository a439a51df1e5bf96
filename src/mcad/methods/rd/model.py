"""Reverse Distillation (Deng & Li, CVPR 2022) as a pure ``nn.Module``.

teacher (frozen) -> [f1, f2, f3] -> OCBE -> embedding -> student decoder -> [s1, s2, s3];
trained so that the student reproduces the teacher's features of normal images; the anomaly map
is the per-pixel cosine distance between the two, averaged over levels.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mcad.losses.cosine import fused_cosine_map


class ReverseDistillation(nn.Module):
    """Teacher, one-class bottleneck embedding and student decoder.

    Args:
        backbone: Frozen teacher returning three maps (``channels``/``strides`` attributes).
        ocbe: Builds the bottleneck from the teacher widths: ``ocbe(channels) -> nn.Module`` with
            an ``out_channels`` attribute.
        decoder: Builds the student: ``decoder(in_channels=..., channels=...) -> nn.Module``.
    """

    def __init__(self, backbone: nn.Module, ocbe: Callable[..., nn.Module], decoder: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.teacher = backbone
        channels = list(backbone.channels)
        self.ocbe = ocbe(channels=channels)
        self.decoder = decoder(in_channels=self.ocbe.out_channels, channels=channels)

    def embed(self, features: list[Tensor]) -> Tensor:
        """The one-class embedding of teacher features."""
        return self.ocbe(features)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Returns ``(teacher features, student features)``, both shallow to deep."""
        teacher = self.teacher(images)
        student = self.decoder(self.ocbe(teacher))
        return teacher, student

    def anomaly_map(self, images: Tensor) -> Tensor:
        """``(B, 1, h1, w1)`` mean cosine distance at the shallowest level's resolution."""
        teacher, student = self(images)
        return fused_cosine_map(teacher, student, size=tuple(teacher[0].shape[-2:]))
