"""Lightning glue of Reverse Distillation: optimiser, schedule, training step, anomaly maps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from mcad.losses.cosine import GlobalCosineLoss
from mcad.methods.base import AnomalyMaps, AnomalyModule
from mcad.methods.rd.model import ReverseDistillation


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
        synthesizer: Unused by RD (accepted so every method shares one constructor shape).
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: Callable[..., nn.Module],
        ocbe: Callable[..., nn.Module],
        loss: nn.Module,
        optimizer: Callable[..., Any],
        scheduler: Callable[..., Any] | None = None,
        protocol: Any = None,
        on_nonfinite: str = "raise",
        synthesizer: Any = None,
    ) -> None:
        super().__init__(protocol=protocol, on_nonfinite=on_nonfinite, loss=loss, default_loss=GlobalCosineLoss)
        self.model = ReverseDistillation(backbone, ocbe, decoder)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        teacher, student = self.model(batch["image"])
        return {"loss": self.loss_fn(teacher, student)}

    def dense_features(self, images: Tensor) -> list[Tensor]:
        """The student's reconstructed features (the trainable dense maps)."""
        return self.model(images)[1]

    def global_embedding(self, images: Tensor) -> Tensor:
        """Global average pool of the one-class embedding (CCL's global feature)."""
        return self.model.embed(self.model.teacher(images)).mean(dim=(2, 3))

    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        return AnomalyMaps(self.model.anomaly_map(images))

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
