"""Lightning glue of CCL on Reverse Distillation: two views, feature noise, three losses, two learning rates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol
from mcad.losses.cosine import GlobalCosineLoss
from mcad.methods.base import AnomalyModule
from mcad.methods.ccl_rd.model import CCLReverseDistillation
from mcad.methods.plugins.base import Batch, ContrastiveFeatures
from mcad.methods.plugins.ccl import CCLPlugin

__all__ = ["CCLRDModule"]


class CCLRDModule(AnomalyModule):
    """Multi-class RD with class-aware contrastive learning (CCL; official LGC-AD/AD-LGC).

    Per training step: teacher maps of the clean and augmented views, projection of both, feature noise on
    the clean projection, OCBE of both (E-CCL1), student of the clean view; loss = global-cosine
    reconstruction + dense class-aware CL + global class-aware CL. The contrastive terms, their options
    (``conf/loss/ccl.yaml``) and the labels (``gt`` / ``kmeans``, carried by the batch) are the CCL plug-in's,
    reached through the same one-pass hook as ``method=rd loss=ccl``; here the hook hands over CCL's
    projected maps, the raw teacher maps for the correspondence and the pooled OCBE embeddings.

    Optimisation: the official trainer uses two Adam optimisers (projection lr ``proj_lr``, OCBE + decoder
    lr ``optimizer.lr``, same betas), zeroes both, back-propagates once, clips the grad-norm of ALL
    parameters jointly (``timm.utils.dispatch_clip_grad(net.parameters(), 5)``, mode ``norm``) and steps
    both. Adam's state is per parameter, so one Adam with two parameter groups is the same update; it
    lets Lightning's automatic ``gradient_clip_val`` clip jointly exactly like the official code.

    Args:
        backbone: Frozen teacher (``backbone`` group; A-RD1: the weight tag is ``backbone.model_name``).
        decoder: Partial building the student decoder (``decoder`` group).
        ocbe: Partial building the bottleneck (A-RD2: ``base_width`` 64 = ADer/CCL, 128 = RD4AD).
        loss: The CCL plug-in (``loss=ccl``); ``None`` builds one with the default settings.
        optimizer: Partial Adam for OCBE + decoder (official 5e-3, betas (0.5, 0.999)); it is called with
            two parameter groups, the projection group carrying ``proj_lr``.
        proj_lr: Learning rate of the projection layers (official 1e-3 = lr / 5).
        scheduler: Partial schedule ``(optimizer, total_steps)`` stepped every iteration, or ``None`` for
            the official constant LR (its configured step schedule never reaches these optimisers).
        separable_projection: Depthwise-separable projection (HEAD ``dp=True``); default dense.
        proj_width_multiplier: Hidden-width multiplier of the projection layers (1 = official C/2, C/4, C/2).
        noise_prob: Feature-noise probability per step; ``None`` = official ``N(0,1) > 0.5`` rule (≈ 0.31).
        noise_mask_prob: Fraction of perturbed locations (0.5).
        noise_std: Noise standard deviation (1).
        aug_view_updates_bn: The augmented view's OCBE pass updates the running BatchNorm statistics (official,
            E-CCL1: true); false leaves them to the clean view.
        protocol: Evaluation protocol.
        on_nonfinite: ``raise`` or ``skip`` batches with a NaN/Inf loss.
    """

    loss_fn: Callable[..., Tensor]  # never None here: the base builds default_loss when loss is a plug-in

    def __init__(
        self,
        backbone: nn.Module,
        decoder: Callable[..., nn.Module],
        ocbe: Callable[..., nn.Module],
        loss: nn.Module | None,
        optimizer: Callable[..., Any],
        proj_lr: float = 0.001,
        scheduler: Callable[..., Any] | None = None,
        separable_projection: bool = False,
        proj_width_multiplier: int = 1,
        noise_prob: float | None = None,
        noise_mask_prob: float = 0.5,
        noise_std: float = 1.0,
        aug_view_updates_bn: bool = True,
        protocol: EvalProtocol | dict | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        if loss is None:
            loss = CCLPlugin()
        if not isinstance(loss, CCLPlugin):
            raise TypeError(
                f"method=ccl_rd needs the CCL loss group (loss=ccl), got {type(loss).__name__}. For plain RD use "
                "method=rd."
            )
        super().__init__(protocol=protocol, on_nonfinite=on_nonfinite, loss=loss, default_loss=GlobalCosineLoss)
        self.model = CCLReverseDistillation(
            backbone, ocbe, decoder, separable_projection=separable_projection,
            proj_width_multiplier=proj_width_multiplier, noise_prob=noise_prob,
            noise_mask_prob=noise_mask_prob, noise_std=noise_std, aug_view_updates_bn=aug_view_updates_bn,
        )  # fmt: skip
        self.optimizer_factory = optimizer
        self.proj_lr = float(proj_lr)
        self.scheduler_factory = scheduler

    # ---------------------------------------------------------------------------- training
    def contrastive_forward(self, batch: Batch) -> tuple[dict[str, Tensor], ContrastiveFeatures]:
        """The two-view pass: reconstruction loss and CCL's features (projected maps, teacher, embeddings)."""
        out = self.model.train_forward(batch["image"], batch["image_aug"], noise=self.training)
        rec = self.loss_fn(out.teacher, out.student)
        features = ContrastiveFeatures(
            dense=out.proj, dense_aug=out.proj_aug, embedding=out.embedding, embedding_aug=out.embedding_aug,
            correspondence=out.teacher, correspondence_aug=out.teacher_aug,
        )  # fmt: skip
        return {"loss": rec, "cos": rec}, features

    def configure_optimizers(self) -> Any:
        proj = [p for p in self.model.proj.parameters() if p.requires_grad]
        ids = {id(p) for p in proj}
        rest = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        optimizer = self.optimizer_factory([{"params": rest}, {"params": proj, "lr": self.proj_lr}])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------------------------- inference
    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        return AnomalyMaps(self.model.level_maps(images))
