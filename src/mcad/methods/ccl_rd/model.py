"""Reverse Distillation with CCL's projection layers as a pure ``nn.Module``.

teacher (frozen) -> [T1, T2, T3] -> projection (RD++ ``ProjLayer`` per level) -> [P1, P2, P3]
-> OCBE -> embedding -> student decoder -> [S1, S2, S3]; the anomaly map compares the RAW teacher
features T with S (the projection only feeds the bottleneck), exactly as plain RD does.

The teacher, OCBE and decoder are RD's own blocks, held by composition in a
:class:`~mcad.methods.rd.model.ReverseDistillation` (``self.rd``); this module only inserts the
projection between the teacher and the OCBE and adds the two-view training pass.

Official reference: LGC-AD/AD-LGC v1 ``model/lgc.py::LGC.train_forward`` (HEAD ``model/rd.py::RDLGC``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from mcad.losses.cosine import cosine_distance_map
from mcad.methods.ccl_rd.components import MultiProjectionLayer, feature_noise_
from mcad.methods.rd.model import RDOutput, ReverseDistillation
from mcad.models.backbones import backbone_levels
from mcad.models.blocks.batchnorm import running_stats_frozen

__all__ = ["CCLForward", "CCLReverseDistillation"]


@dataclass
class CCLForward:
    """Everything one training step of CCL-on-RD needs.

    Attributes:
        teacher: Raw teacher maps of the clean view (reconstruction targets, correspondence source).
        teacher_aug: Raw teacher maps of the augmented view (correspondence source).
        proj: Projected clean-view maps, after the in-place feature noise (dense-loss queries).
        proj_aug: Projected augmented-view maps (dense-loss keys).
        student: Student reconstruction of the clean view.
        embedding: ``(B, D)`` global feature of the clean view (GAP of the OCBE output).
        embedding_aug: ``(B, D)`` global feature of the augmented view.
        noised: Whether the feature noise fired on this step.
    """

    teacher: list[Tensor]
    teacher_aug: list[Tensor]
    proj: list[Tensor]
    proj_aug: list[Tensor]
    student: list[Tensor]
    embedding: Tensor
    embedding_aug: Tensor
    noised: bool


class CCLReverseDistillation(nn.Module):
    """RD (teacher, OCBE, student) with one trainable projection layer per teacher level.

    Args:
        backbone: Frozen teacher returning three maps (``channels`` attribute).
        ocbe: Builds the bottleneck: ``ocbe(channels=...) -> nn.Module`` with ``out_channels``.
        decoder: Builds the student: ``decoder(in_channels=..., channels=...) -> nn.Module``.
        separable_projection: Depthwise-separable projection (later official code's ``dp=True``);
            ``False`` = the RD++ dense 3×3 convolutions of both official versions.
        proj_width_multiplier: Hidden-width multiplier of the projection layers (1 = official C/2, C/4, C/2).
        noise_prob: Per-step probability of the feature noise; ``None`` = the official rule (one
            ``N(0, 1) > 0.5`` draw, p ≈ 0.31); ``0`` disables it.
        noise_mask_prob: Fraction of perturbed locations (official 0.5).
        noise_std: Standard deviation of the noise (official 1).
        aug_view_updates_bn: Whether the augmented view's OCBE pass updates the OCBE's running BatchNorm
            statistics (official: yes, errata E-CCL1). ``False`` keeps the pass (its embedding feeds the
            global loss, normalised with its own batch statistics) but leaves the test-time statistics to
            the clean view, the only one the student decodes.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ocbe: Callable[..., nn.Module],
        decoder: Callable[..., nn.Module],
        separable_projection: bool = False,
        proj_width_multiplier: int = 1,
        noise_prob: float | None = None,
        noise_mask_prob: float = 0.5,
        noise_std: float = 1.0,
        aug_view_updates_bn: bool = True,
    ) -> None:
        super().__init__()
        # The projection keeps the teacher widths, so RD's OCBE and decoder are built unchanged.
        self.rd = ReverseDistillation(backbone, ocbe, decoder)
        self.proj = MultiProjectionLayer(
            backbone_levels(backbone, "channels"),
            separable=separable_projection,
            width_multiplier=proj_width_multiplier,
        )
        self.noise_prob = noise_prob
        self.noise_mask_prob = noise_mask_prob
        self.noise_std = noise_std
        self.aug_view_updates_bn = aug_view_updates_bn

    @property
    def teacher(self) -> nn.Module:
        """The frozen feature extractor."""
        return self.rd.teacher

    def bottleneck(self, teacher: list[Tensor]) -> Tensor:
        """OCBE embedding of projected teacher features (no noise)."""
        return self.rd.ocbe(self.proj(teacher))

    def forward(self, images: Tensor) -> RDOutput:
        """Inference pass: raw teacher maps, bottleneck embedding of the projected maps, student maps."""
        teacher = self.teacher(images)
        embedding = self.bottleneck(teacher)
        return RDOutput(teacher=teacher, embedding=embedding, student=self.rd.decoder(embedding))

    def train_forward(self, images: Tensor, images_aug: Tensor, noise: bool = True) -> CCLForward:
        """The two-view training pass (official ``train_forward``).

        Both views go through the projection AND the OCBE (errata E-CCL1: the augmented view's
        OCBE pass also updates the BatchNorm statistics, which changes test-time behaviour, so it
        is always run; ``aug_view_updates_bn=False`` keeps the pass but not its statistics); only the
        clean view is decoded.

        Args:
            images: Clean view ``(B, 3, H, W)``.
            images_aug: Augmented view of the same images, same size.
            noise: Apply the feature noise (training only; the caller passes ``self.training``).
        """
        teacher = self.teacher(images)
        teacher_aug = self.teacher(images_aug)
        proj = self.proj(teacher)
        proj_aug = self.proj(teacher_aug)
        noised = False
        if noise and self.noise_prob != 0:
            # In place on the clean view only: OCBE, student and dense loss all see the noisy maps
            # (official `model/lgc.py`: `feats_t_q_grid[i] += noise * mask`).
            noised = feature_noise_(proj, prob_apply=self.noise_prob, mask_prob=self.noise_mask_prob,
                                    std=self.noise_std)  # fmt: skip
        mid = self.rd.ocbe(proj)
        if self.aug_view_updates_bn:
            mid_aug = self.rd.ocbe(proj_aug)
        else:
            with running_stats_frozen(self.rd.ocbe):
                mid_aug = self.rd.ocbe(proj_aug)
        student = self.rd.decoder(mid)
        return CCLForward(
            teacher=teacher,
            teacher_aug=teacher_aug,
            proj=proj,
            proj_aug=proj_aug,
            student=student,
            embedding=mid.mean(dim=(2, 3)),
            embedding_aug=mid_aug.mean(dim=(2, 3)),
            noised=noised,
        )

    def level_maps(self, images: Tensor) -> list[Tensor]:
        """Per-level ``(B, 1, h_i, w_i)`` cosine distances between raw teacher and student maps."""
        out = self(images)
        return [cosine_distance_map(t, s) for t, s in zip(out.teacher, out.student)]
