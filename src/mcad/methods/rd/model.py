"""Reverse Distillation (Deng & Li, CVPR 2022) as a pure ``nn.Module``.

teacher (frozen) -> [f1, f2, f3] -> OCBE -> embedding -> student decoder -> [s1, s2, s3];
trained so that the student reproduces the teacher's features of normal images; the anomaly map
is the per-pixel cosine distance between the two at each level, upsampled and averaged by the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mcad.losses.cosine import cosine_distance_map
from mcad.models.backbones import backbone_levels

__all__ = ["RDOutput", "ReverseDistillation"]


@dataclass
class RDOutput:
    """One forward pass of Reverse Distillation.

    Attributes:
        teacher: Frozen teacher maps, shallow to deep (the reconstruction targets).
        embedding: The one-class bottleneck embedding ``(B, C, h, w)`` (OCBE output).
        student: The student's reconstruction of ``teacher``, level by level.
    """

    teacher: list[Tensor]
    embedding: Tensor
    student: list[Tensor]


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
        channels = backbone_levels(backbone, "channels")
        self.ocbe = ocbe(channels=channels)
        self.decoder = decoder(in_channels=self.ocbe.out_channels, channels=channels)

    def forward(self, images: Tensor) -> RDOutput:
        """Teacher maps, bottleneck embedding and student maps of a batch."""
        teacher = self.teacher(images)
        embedding = self.ocbe(teacher)
        return RDOutput(teacher=teacher, embedding=embedding, student=self.decoder(embedding))

    def level_maps(self, images: Tensor) -> list[Tensor]:
        """Per-level ``(B, 1, h_i, w_i)`` cosine distances between teacher and student, shallow to deep.

        The evaluation protocol upsamples each level straight to the evaluation size and averages them
        (ADer ``util/metric.py::cal_anomaly_map``, RD4AD ``test.py``).
        """
        out = self(images)
        return [cosine_distance_map(t, s) for t, s in zip(out.teacher, out.student)]
