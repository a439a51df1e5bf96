"""Lightning glue of RLR: decoder construction, optimisation schedule (A-RLR3), training step, maps.

Everything method-specific that needs no Lightning lives in :mod:`mcad.methods.rlr.model`; the base
class does all evaluation (upsampling, smoothing, image scores, metrics).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn

from mcad.evaluation.protocol import AnomalyMaps
from mcad.methods.base import AnomalyModule
from mcad.methods.plugins.base import Batch, ContrastiveFeatures
from mcad.methods.rlr.components.decoder import RLRDecoder, out_index_from_stride
from mcad.methods.rlr.model import SCHEDULES, MSECosineLoss, RLRModel, rlr_optimization_step
from mcad.models.backbones import backbone_levels

if TYPE_CHECKING:
    from mcad.methods.rlr.model import StepOptimizer


def build_decoder(
    decoder: Callable[..., RLRDecoder], channels: list[int], strides: list[int], input_size: int
) -> RLRDecoder:
    """Calls the ``decoder`` config partial with the backbone's levels at the input size.

    Grids are ``input_size // stride``. Unless the config fixes ``hidden_dims`` or ``out_indices``,
    the width rule reads the timm stage index from the stride (``log2(stride) - 1``), as
    :meth:`RLRDecoder.for_backbone` does: stride 8 -> d = 256, stride 16 -> d = 512 for any CNN.

    Args:
        decoder: Partial of :class:`RLRDecoder` (``decoder=rlr``) or any callable with its signature.
        channels: ``backbone.channels``.
        strides: ``backbone.strides``.
        input_size: Side of the images the network receives.

    Returns:
        The decoder.
    """
    preset = getattr(decoder, "keywords", {}) if isinstance(decoder, functools.partial) else {}
    kwargs: dict[str, Any] = {}
    if preset.get("hidden_dims") is None and preset.get("out_indices") is None:
        kwargs["out_indices"] = [out_index_from_stride(s) for s in strides]
    grids = [(input_size // s, input_size // s) for s in strides]
    return decoder(in_channels=list(channels), grid_sizes=grids, **kwargs)


class RLRModule(AnomalyModule):
    """Multi-class RLR: a frozen backbone and one learnable-reference transformer per feature level.

    Args:
        backbone: Frozen feature extractor (``backbone`` group) with ``channels`` and ``strides``. The
            3x3 average pooling of RLR is its ``feature_pool=3`` (set by ``method=rlr``; ``null`` is
            the official ``--no_avg``): this module never pools again.
        decoder: Partial of :class:`~mcad.methods.rlr.components.decoder.RLRDecoder` (``decoder`` group), completed
            here with the backbone's channels and the grids at the input size.
        optimizer: Partial optimiser (Adam lr 1e-4, default betas, no weight decay).
        loss: Per-level criterion ``loss(pred, target)`` (``loss=mse_cosine``), or a loss plug-in
            (``loss=ccl``) added to the default :class:`~mcad.methods.rlr.model.MSECosineLoss`.
        synthesizer: Feature-level synthesizer applied to the decoder input in training
            (``synthesizer=feature_jitter``: scale 4 on all tokens), or ``None`` for clean inputs.
        image_size: ``data.image_size``; with ``crop_size`` it fixes the grids (and the size of the
            learnable reference) of the decoder.
        crop_size: ``data.crop_size`` (the network input side when set).
        optimization: A-RLR3. ``summed`` (default): automatic optimisation, one optimiser over all
            levels stepped on the sum of the level losses — the levels share no parameters and Adam is
            element-wise, so this equals one Adam per level and the official loop under torch >= 2.
            ``per_level``: manual optimisation, one optimiser per level, level after level.
            ``shared_adam_legacy``: manual, one optimiser over all levels with zeroed (not cleared)
            gradients, the official loop under its pinned torch 1.12 (E-RLR1).
        scheduler: Partial LR schedule called with ``(optimizer, total_steps)`` and stepped once per
            batch, or ``None`` (RLR: constant LR).
        protocol: Evaluation protocol.
        on_nonfinite: ``raise`` or ``skip`` batches (levels, under manual optimisation) with a NaN/Inf loss.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: Callable[..., RLRDecoder],
        optimizer: Callable[..., Any],
        loss: nn.Module | None = None,
        synthesizer: Any = None,
        image_size: int = 256,
        crop_size: int | None = None,
        optimization: str = "summed",
        scheduler: Callable[..., Any] | None = None,
        protocol: Any = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__(protocol=protocol, on_nonfinite=on_nonfinite, loss=loss, default_loss=MSECosineLoss)
        if optimization not in SCHEDULES:
            raise ValueError(f"method.optimization must be one of {SCHEDULES}, got '{optimization}'.")
        if synthesizer is not None and getattr(synthesizer, "level", "image") != "feature":
            raise ValueError(
                "RLR trains on normal images with a feature-level synthesizer (synthesizer=feature_jitter or "
                f"none); got the image-level {type(synthesizer).__name__}."
            )
        if optimization != "summed" and self.loss_plugin is not None:
            # A plug-in's terms couple the levels through the global embedding: no per-level split.
            raise ValueError(f"A loss plug-in needs method.optimization=summed, not '{optimization}'.")
        self.input_size = int(crop_size or image_size)
        channels, strides = backbone_levels(backbone, "channels"), backbone_levels(backbone, "strides")
        built = build_decoder(decoder, channels, strides, self.input_size)
        self.model = RLRModel(backbone, built, jitter=synthesizer, loss_fn=self.loss_fn)
        self.optimization = optimization
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # Manual optimisation only where the official per-level stepping must be reproduced literally.
        self.automatic_optimization = optimization == "summed"

    # ---------------------------------------------------------------------------------- training
    @staticmethod
    def _named(losses: list[Tensor]) -> dict[str, Tensor]:
        return {f"level{i}": value for i, value in enumerate(losses)}

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-level losses and their sum (``optimization=summed``)."""
        losses = self.model.forward_train(batch["image"]).losses
        return {"loss": sum(losses[1:], losses[0]), **self._named(losses)}

    def contrastive_forward(self, batch: Batch) -> tuple[dict[str, Tensor], ContrastiveFeatures]:
        """RLR's level losses and, for a plug-in, each level's input embedding of both views.

        The clean view's training pass is the ordinary one (jittered inputs, clean targets). The augmented
        view only runs the frozen backbone and the levels' linear input embeddings, so a plug-in costs one
        frozen backbone pass and a few linear maps per step. The dense features are those embeddings of the
        clean (unjittered) features of each view, the global embedding their spatial means concatenated, and
        the views are matched on the frozen pooled backbone features.
        """
        out = self.model.forward_train(batch["image"])
        features_aug = self.model.extract_features(batch["image_aug"])
        dense = self.model.input_embeddings(out.features)
        dense_aug = self.model.input_embeddings(features_aug)
        features = ContrastiveFeatures(
            dense=dense, dense_aug=dense_aug, embedding=_pooled(dense), embedding_aug=_pooled(dense_aug),
            correspondence=out.features, correspondence_aug=features_aug,
        )  # fmt: skip
        return {"loss": sum(out.losses[1:], out.losses[0]), **self._named(out.losses)}, features

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Automatic optimisation: the base class's step; manual: RLR's level-by-level steps."""
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        lightning_optimizers = self.optimizers()
        optimizers: list[StepOptimizer] = (
            list(lightning_optimizers) if isinstance(lightning_optimizers, list) else [lightning_optimizers]
        )

        def should_step(loss: Tensor) -> bool:
            return self.check_losses({"loss": loss}, batch)

        losses = rlr_optimization_step(
            self.model,
            batch["image"],
            optimizers,
            schedule=self.optimization,
            backward=self.manual_backward,
            should_step=should_step,
        )
        schedulers = self.lr_schedulers()
        for scheduler in schedulers if isinstance(schedulers, list) else [schedulers] if schedulers else []:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise TypeError("method.scheduler: ReduceLROnPlateau needs a metric; RLR steps every iteration.")
            scheduler.step()
        self.log_losses({"loss": sum(losses[1:], losses[0]), **self._named(losses)}, batch_size=len(batch["image"]))
        return None

    def on_fit_start(self) -> None:
        """Refuses a manual level-by-level schedule under DDP that cannot see the idle level's parameters.

        ``per_level`` and ``shared_adam_legacy`` back-propagate one level at a time, so every backward pass
        leaves the other level's parameters unused, which DDP's default reducer treats as an error.
        """
        strategy = self.trainer.strategy
        unused_ok = bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False))
        if not self.automatic_optimization and isinstance(strategy, DDPStrategy) and not unused_ok:
            raise RuntimeError(
                f"method.optimization={self.optimization} steps one level at a time, which DDP only allows with "
                "trainer.strategy=ddp_find_unused_parameters_true; or use method.optimization=summed (the same "
                "update as the official loop under torch >= 2)."
            )

    def configure_optimizers(self) -> Any:
        """One optimiser over all levels, or one per level for ``optimization=per_level``."""
        if self.optimization == "per_level":
            optimizers = [self.optimizer_factory(params) for params in self.model.level_parameters()]
        else:
            optimizers = [self.optimizer_factory([p for p in self.model.decoder.parameters() if p.requires_grad])]
        if self.scheduler_factory is None:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        total = int(self.trainer.estimated_stepping_batches)
        schedulers = [
            {"scheduler": self.scheduler_factory(opt, total_steps=total), "interval": "step"} for opt in optimizers
        ]
        return optimizers, schedulers

    # ---------------------------------------------------------------------------------- inference
    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        """RLR's per-level maps ``mean_C((x - x_hat)^2) + 1 - cos``; the protocol resizes and averages them."""
        return AnomalyMaps(self.model.level_maps(images))


def _pooled(maps: list[Tensor]) -> Tensor:
    """Spatial means of per-level maps, concatenated: ``(B, sum_i d_i)``."""
    return torch.cat([m.mean(dim=(-2, -1)) for m in maps], dim=1)
