"""Lightning glue of Reverse Distillation: optimiser, schedule, training step, anomaly maps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol
from mcad.losses.cosine import GlobalCosineLoss
from mcad.methods.base import AnomalyModule
from mcad.methods.plugins.base import Batch, ContrastiveFeatures
from mcad.methods.rd.model import ReverseDistillation

__all__ = ["RDModule"]


class RDModule(AnomalyModule):
    """Multi-class Reverse Distillation.

    Args:
        backbone: Frozen teacher (``backbone`` config group).
        decoder: Partial building the student decoder (``decoder`` config group).
        ocbe: Partial building the bottleneck embedding (its ``base_width`` is 64 in ADer/CCL, 128 in
            the original RD4AD).
        loss: Reconstruction loss ``loss(teacher, student) -> Tensor`` (``loss`` config group), or
            a loss plug-in (``loss=ccl``) added to the default global-cosine loss.
        optimizer: Partial optimiser (Adam 5e-3, betas (0.5, 0.999)).
        scheduler: Partial schedule called with ``(optimizer, total_steps)``, stepped every
            iteration, or ``None`` for a constant LR.
        protocol: Evaluation protocol.
        on_nonfinite: ``raise`` or ``skip`` batches with a NaN/Inf loss.
    """

    loss_fn: Callable[..., Tensor]  # never None here: the base builds default_loss when loss is a plug-in

    def __init__(
        self,
        backbone: nn.Module,
        decoder: Callable[..., nn.Module],
        ocbe: Callable[..., nn.Module],
        loss: nn.Module,
        optimizer: Callable[..., Any],
        scheduler: Callable[..., Any] | None = None,
        protocol: EvalProtocol | dict | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(protocol=protocol, on_nonfinite=on_nonfinite, loss=loss, default_loss=GlobalCosineLoss)
        self.model = ReverseDistillation(backbone, ocbe, decoder)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        out = self.model(batch["image"])
        return {"loss": self.loss_fn(out.teacher, out.student)}

    def contrastive_forward(self, batch: Batch) -> tuple[dict[str, Tensor], ContrastiveFeatures]:
        """RD's loss and, for a plug-in, the OCBE embedding of both views (one pass each).

        Plain RD has nothing trainable before its bottleneck, so the dense features are the OCBE output
        (one 8x8 level for WRN50) and the global embedding is its spatial mean. The augmented view runs the
        teacher and the OCBE only (no student); like CCL's augmented OCBE pass it updates the OCBE's BatchNorm
        statistics (docs/codes.md E-CCL1).
        """
        out = self.model(batch["image"])
        embedding_aug = self.model.ocbe(self.model.teacher(batch["image_aug"]))
        features = ContrastiveFeatures(
            dense=[out.embedding], dense_aug=[embedding_aug],
            embedding=out.embedding.mean(dim=(2, 3)), embedding_aug=embedding_aug.mean(dim=(2, 3)),
        )  # fmt: skip
        return {"loss": self.loss_fn(out.teacher, out.student)}, features

    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        return AnomalyMaps(self.model.level_maps(images))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
