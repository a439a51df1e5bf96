"""RLR as a pure ``nn.Module``: frozen backbone + per-level learnable-reference reconstruction.

This module holds everything method-specific that does not need Lightning: feature extraction
(frozen backbone, optional 3x3 average pooling), the jittered-input / clean-target training pass with
RLR's per-level loss, the anomaly map, hooks for contrastive plug-ins, and one optimisation step in
the three schedules of codes A-RLR3 / E-RLR1 (``docs/codes.md``; see :func:`rlr_optimization_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mcad.losses.reconstruction import mse_cosine_loss, mse_cosine_score
from mcad.methods.rlr.components.decoder import RLRDecoder, RLRLevelModel
from mcad.models.backbones import backbone_levels
from mcad.synthesis.feature_jitter import FeatureJitter

if TYPE_CHECKING:  # annotations only: this module does not need Lightning
    from lightning.pytorch.core.optimizer import LightningOptimizer

    # A torch optimiser, or Lightning's wrapper of one (what ``LightningModule.optimizers()`` returns).
    StepOptimizer = torch.optim.Optimizer | LightningOptimizer

FeatureTransform = Callable[[list[Tensor]], list[Tensor]]
LevelLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class RLROutput:
    """One training pass of RLR, per level: loss, clean target features and reconstructions."""

    losses: list[Tensor]
    features: list[Tensor]
    reconstructions: list[Tensor]


class MSECosineLoss(nn.Module):
    """RLR's per-level criterion as a module (the ``loss=mse_cosine`` config).

    ``loss(pred, target) = MSE(pred, target) + mean_tokens(1 - cos_C(pred, target))`` for ONE level
    (:func:`~mcad.losses.reconstruction.mse_cosine_loss`); the method applies it to every level.
    """

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Returns the scalar loss of one level's reconstruction ``pred`` of ``target``."""
        return mse_cosine_loss(pred, target)


class RLRModel(nn.Module):
    """Frozen backbone, optional feature jitter and an :class:`~mcad.methods.rlr.components.decoder.RLRDecoder`.

    Args:
        backbone: A frozen feature extractor (:class:`~mcad.models.backbones.TimmBackbone`, which freezes and
            keeps itself in eval mode) with ``forward(images) -> list[Tensor]`` of ``(B, C_i, h_i, w_i)``
            maps. RLR's 3x3 average pooling of the features is the backbone's ``feature_pool=3``. If it
            exposes ``channels`` they must match the decoder's.
        decoder: The per-level reconstruction network.
        jitter: Feature-level synthesizer applied to the decoder *input* during training only
            (RLR: :class:`~mcad.synthesis.feature_jitter.FeatureJitter` with scale 4); ``None`` = off.
        loss_fn: Per-level criterion ``loss_fn(pred, target) -> scalar``; default RLR's
            :func:`~mcad.losses.reconstruction.mse_cosine_loss`.

    """

    def __init__(
        self,
        backbone: nn.Module,
        decoder: RLRDecoder,
        jitter: FeatureTransform | None = None,
        loss_fn: LevelLoss | None = None,
    ) -> None:
        super().__init__()
        channels = getattr(backbone, "channels", None)
        if channels is not None and list(channels) != list(decoder.in_channels):
            raise ValueError(f"Backbone channels {list(channels)} != decoder in_channels {decoder.in_channels}.")
        self.backbone = backbone
        self.decoder = decoder
        self.jitter = jitter
        self.loss_fn: LevelLoss = loss_fn if loss_fn is not None else mse_cosine_loss

    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        image_size: int | tuple[int, int],
        jitter_scale: float = 4.0,
        jitter_prob: float = 1.0,
        **decoder_kwargs,
    ) -> RLRModel:
        """Builds the decoder from ``backbone.channels``/``backbone.strides`` (RLR defaults).

        Args:
            backbone: Backbone exposing ``channels`` and ``strides``.
            image_size: Input image side or ``(H, W)``.
            jitter_scale: Feature-jitter scale (0 = no jitter).
            jitter_prob: Fraction of jittered tokens.
            **decoder_kwargs: Passed to :meth:`RLRDecoder.for_backbone`.

        Returns:
            The model.

        """
        channels, strides = backbone_levels(backbone, "channels"), backbone_levels(backbone, "strides")
        decoder = RLRDecoder.for_backbone(channels, strides, image_size, **decoder_kwargs)
        jitter = FeatureJitter(jitter_scale, jitter_prob) if jitter_scale > 0 else None
        return cls(backbone, decoder, jitter=jitter)

    def extract_features(self, images: Tensor) -> list[Tensor]:
        """Frozen backbone features (pooled by the backbone), the reconstruction targets.

        Args:
            images: ``(B, 3, H, W)`` normalised images.

        Returns:
            ``(B, C_i, h_i, w_i)`` maps without gradient.

        """
        with torch.no_grad():
            return list(self.backbone(images))

    def forward_train(self, images: Tensor) -> RLROutput:
        """Training pass: jittered features in, clean features as targets.

        Args:
            images: ``(B, 3, H, W)``.

        Returns:
            Per level: the loss (``loss_fn``, by default
            :func:`~mcad.losses.reconstruction.mse_cosine_loss`), the clean targets and the reconstructions.
        """
        features = self.extract_features(images)
        inputs = self.jitter(features) if self.jitter is not None else features
        recons = self.decoder(inputs)
        losses = [self.loss_fn(r, f) for r, f in zip(recons, features)]
        return RLROutput(losses=losses, features=features, reconstructions=recons)

    def input_embeddings(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Each level's trainable linear embedding ``C -> d`` of the given features, as ``(B, d, h, w)`` maps.

        What a contrastive plug-in contrasts: the map through which the features enter the level's
        transformer (the analogue of CCL's projection layers), without the fixed position encoding.
        """
        maps = []
        for level, f in zip(self.decoder.levels, features):
            assert isinstance(level, RLRLevelModel)  # the decoder holds only RLRLevelModel levels
            b, _, h, w = f.shape
            tokens = level.embedding.proj(f.flatten(2).transpose(1, 2))
            maps.append(tokens.transpose(1, 2).reshape(b, -1, h, w))
        return maps

    def level_loss(self, features: Sequence[Tensor], index: int) -> Tensor:
        """Training loss of one level from precomputed clean features (jitter applied here).

        Args:
            features: Clean features from :meth:`extract_features`.
            index: Level index.

        Returns:
            The level's scalar loss.

        """
        target = features[index]
        source = self.jitter([target])[0] if self.jitter is not None else target
        return self.loss_fn(self.decoder.forward_level(index, source), target)

    def level_maps(self, images: Tensor) -> list[Tensor]:
        """Per-level RLR scores ``mean_C((x - x_hat)^2) + 1 - cos_C`` as ``(B, 1, h_i, w_i)`` maps (no grad).

        The evaluation protocol upsamples each level straight to the evaluation size and averages them,
        as RLR's ``trainer.py::test_separate`` does at the image size.
        """
        with torch.no_grad():
            features = self.extract_features(images)
            recons = self.decoder(features)
            return [mse_cosine_score(r, f).unsqueeze(1) for r, f in zip(recons, features)]

    def anomaly_map(self, images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """RLR anomaly map: per-level ``mean_C((x - x_hat)^2) + 1 - cos_C``, resized and averaged.

        Args:
            images: ``(B, 3, H, W)``.
            size: Output size; default the first (finest) level's grid. Each level is resized
                bilinearly (``align_corners=True``) straight to ``size``; RLR itself resizes every level
                directly to the image size (``size=(256, 256)``), which differs slightly from resizing to
                the finest grid first and to the image later.

        Returns:
            ``(B, 1, h, w)`` unsmoothed map (smoothing and image scores are the evaluator's job).

        """
        scores = self.level_maps(images)
        out_size = tuple(size) if size is not None else tuple(scores[0].shape[-2:])
        maps = [F.interpolate(s, size=out_size, mode="bilinear", align_corners=True) for s in scores]
        return torch.stack(maps, dim=0).mean(dim=0)

    def forward(self, images: Tensor) -> Tensor:
        """Inference: the anomaly map at the finest level's resolution (see :meth:`anomaly_map`)."""
        return self.anomaly_map(images)

    def level_parameters(self) -> list[list[nn.Parameter]]:
        """Trainable parameters grouped per level (one optimiser per level, A-RLR3)."""
        return [list(level.parameters()) for level in self.decoder.levels]


SCHEDULES = ("per_level", "summed", "shared_adam_legacy")


def rlr_optimization_step(
    model: RLRModel,
    images: Tensor,
    optimizers: StepOptimizer | list[StepOptimizer] | tuple[StepOptimizer, ...],
    schedule: str = "per_level",
    backward: Callable[[Tensor], None] | None = None,
    should_step: Callable[[Tensor], bool] | None = None,
) -> list[Tensor]:
    """One RLR training iteration (forward, backward, step) under a chosen optimiser schedule.

    The official loop (RLR ``trainer.py::train``) runs, per level, ``zero_grad -> backward -> step`` on
    ONE Adam over all levels. What that does depends on the torch version (E-RLR1):

    * ``"per_level"`` (default, = the official loop on torch >= 2): ``zero_grad`` clears gradients to
      ``None`` so each step only touches the level that just back-propagated. Pass one optimiser per
      level (from :meth:`RLRModel.level_parameters`) or one shared optimiser.
    * ``"summed"``: one backward of the summed level losses and one step of one optimiser. The levels
      share no parameters, so each level's gradient is that of its own loss and an element-wise
      optimiser such as Adam produces exactly the ``"per_level"`` update.
    * ``"shared_adam_legacy"`` (= the official loop on its pinned torch 1.12): gradients are *zeroed*,
      not cleared, so during one level's step the other levels receive a momentum-only Adam update
      and their step counters advance too. Needs one optimiser over all levels.

    Args:
        model: The RLR model (in train mode).
        images: ``(B, 3, H, W)``.
        optimizers: One optimiser (any schedule) or one per level (``"per_level"`` only).
        schedule: One of :data:`SCHEDULES`.
        backward: Called as ``backward(loss)``; default ``loss.backward()``. In Lightning manual
            optimisation pass ``self.manual_backward``.
        should_step: Called with each loss just before its backward pass (a level's loss, or the sum
            for ``"summed"``); returning ``False`` skips that backward and step (e.g. a non-finite
            loss under ``on_nonfinite=skip``). Default: always step.

    Returns:
        The detached per-level losses.

    """
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown schedule '{schedule}' (known: {SCHEDULES}).")
    do_backward = backward if backward is not None else Tensor.backward
    # Lightning's LightningOptimizer wraps (is not an) Optimizer: treat anything but a list/tuple as one.
    opts = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
    num_levels = len(model.decoder.levels)
    if schedule == "summed":
        if len(opts) != 1:
            raise ValueError("schedule='summed' needs exactly one optimizer.")
        losses = model.forward_train(images).losses
        total = torch.stack(losses).sum()
        if should_step is None or should_step(total):
            opts[0].zero_grad(set_to_none=True)
            do_backward(total)
            opts[0].step()
        return [loss.detach() for loss in losses]
    if len(opts) == 1:
        opts = opts * num_levels
    elif schedule == "shared_adam_legacy" or len(opts) != num_levels:
        raise ValueError(f"schedule='{schedule}' needs one shared optimizer or one per level.")
    legacy = schedule == "shared_adam_legacy"
    features = model.extract_features(images)
    losses = []
    # As RLR trainer.py::train: each level is run *after* the previous level's step. This matters for
    # the legacy schedule, where that step also moves the later levels' parameters.
    for index, opt in enumerate(opts):
        loss = model.level_loss(features, index)
        losses.append(loss.detach())
        if should_step is not None and not should_step(loss):
            continue
        opt.zero_grad(set_to_none=not legacy)
        do_backward(loss)
        opt.step()
    return losses
