"""The base LightningModule of every method: the shared test path and training-step plumbing.

A method implements:

* ``training_losses(batch) -> dict`` with a ``loss`` entry (or its own ``training_step`` under
  manual optimisation, calling :meth:`AnomalyModule.check_losses` and :meth:`log_losses`);
* ``anomaly_maps(images) -> AnomalyMaps``: raw maps, higher = more anomalous (the one inference entry);
* optionally ``contrastive_forward(batch)`` (:class:`~mcad.methods.plugins.base.ContrastiveMethod`), so
  that loss plug-ins such as CCL can be attached, and ``data_request()`` for what it needs from the data
  layer beyond plain images (a synthesizer).

Everything after the maps (upsampling, fusion with a segmentation map, smoothing, image scores,
ground-truth binarisation, per-class metric accumulation, logging) happens here, identically for
every method, under the run's :class:`~mcad.evaluation.protocol.EvalProtocol`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from mcad.data.requests import DataRequest
from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol
from mcad.evaluation.stitching import evaluate_batch
from mcad.methods.plugins.base import Batch, ContrastiveMethod, LossPlugin

__all__ = ["AnomalyMaps", "AnomalyModule", "NonFiniteLossError", "Phase"]


@dataclass(frozen=True)
class Phase:
    """One training phase of a multi-phase method (returned by its ``training_phases()``).

    Attributes:
        name: Folder name of its checkpoints and the tag they record.
        trainer: Trainer arguments of the phase (``max_steps`` ...).
        data: Data-module settings for the phase's duration (``batch_size``).
    """

    name: str
    trainer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or Inf."""


class AnomalyModule(L.LightningModule):
    """Base class of all methods.

    Args:
        protocol: Evaluation protocol (dataclass or its fields as a mapping).
        on_nonfinite: ``raise`` (stop with the step and the batch's paths) or ``skip`` the batch.
        loss: The method's loss module from the ``loss`` config group, or a
            :class:`~mcad.methods.plugins.base.LossPlugin` (then ``default_loss`` builds the method's own loss
            and the plug-in adds its terms; the method must implement ``contrastive_forward``).
        default_loss: Builds the method's own loss when ``loss`` is ``None`` or a plug-in.
    """

    def __init__(
        self,
        protocol: EvalProtocol | dict | None = None,
        on_nonfinite: str = "raise",
        loss: nn.Module | None = None,
        default_loss: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.loss_plugin: LossPlugin | None = loss if isinstance(loss, LossPlugin) else None
        if self.loss_plugin is not None and not isinstance(self, ContrastiveMethod):
            raise TypeError(
                f"{type(self).__name__} does not offer contrastive features (contrastive_forward), so the loss "
                f"plug-in {type(loss).__name__} cannot be attached to it."
            )
        if isinstance(loss, LossPlugin) or loss is None:
            loss = default_loss() if default_loss is not None else None
        self.loss_fn: Callable[..., Any] | None = loss  # a module, or a function from default_loss
        if isinstance(protocol, dict) or (protocol is not None and not isinstance(protocol, EvalProtocol)):
            protocol = EvalProtocol(**dict(protocol))
        self.protocol: EvalProtocol = protocol or EvalProtocol()
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got '{on_nonfinite}'.")
        self.on_nonfinite = on_nonfinite
        self.class_names: list[str] = []
        self.test_results: dict[str, Any] | None = None
        self._eval: dict[str, Any] = {}  # not registered as a submodule: never in checkpoints

    # ---------------------------------------------------------------------------- method interface
    def anomaly_maps(self, images: Tensor) -> AnomalyMaps:
        """Raw anomaly maps of a batch (subclasses implement)."""
        raise NotImplementedError

    def training_losses(self, batch: Batch) -> dict[str, Tensor]:
        """Losses of a training batch with the total under ``loss`` (subclasses implement)."""
        raise NotImplementedError

    def data_request(self) -> DataRequest:
        """What the method and its loss plug-in need from the data layer (merged; see :mod:`mcad.data.requests`).

        Methods that need more (CRR: its synthesizer) extend this.
        """
        return self.loss_plugin.data_request() if self.loss_plugin is not None else DataRequest()

    # ---------------------------------------------------------------------------- training plumbing
    def check_losses(self, losses: dict[str, Tensor], batch: Batch) -> bool:
        """Checks that every loss is finite.

        Returns:
            True if the batch may be used; False if it must be skipped (``on_nonfinite=skip``).

        Raises:
            NonFiniteLossError: Naming the step, the offending loss and the batch's sample paths.
        """
        bad = [k for k, v in losses.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
        if not bad:
            return True
        paths = list(batch.get("path", []))
        message = (
            f"Non-finite loss {bad} at global step {self.global_step} (epoch {self.current_epoch}); "
            f"batch samples: {paths}"
        )
        if self.on_nonfinite == "skip":
            log.warning("%s -- skipping the batch (on_nonfinite=skip).", message)
            return False
        raise NonFiniteLossError(message + ". Set method.on_nonfinite=skip to skip such batches.")

    def log_losses(self, losses: dict[str, Tensor], batch_size: int) -> None:
        """Logs every loss as ``train/<name>``."""
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True, prog_bar=name == "loss",
                     batch_size=batch_size)  # fmt: skip

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """All losses of a training batch with the total under ``loss``, the plug-in's terms included.

        Without a plug-in this is the method's ``training_losses``; with one, the method's one-pass hook gives
        its own losses and the plug-in's features, and the plug-in's terms are added to the total.
        """
        if self.loss_plugin is None:
            return self.training_losses(batch)
        assert isinstance(self, ContrastiveMethod)
        if "image_aug" not in batch:
            raise RuntimeError(
                "The loss plug-in needs the augmented view batch['image_aug']: build the data module with the "
                "run's data request (mcad.build.build_components does)."
            )
        losses, features = self.contrastive_forward(batch)
        extra = self.loss_plugin(features, batch)
        return {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        """Computes, checks and logs the losses; returns the total (``None`` skips the batch)."""
        losses = self.compute_losses(batch)
        if not self.check_losses(losses, batch):
            return None
        self.log_losses(losses, batch_size=len(batch["image"]))
        return losses["loss"]

    # ---------------------------------------------------------------------------- shared test path
    def on_test_epoch_start(self) -> None:
        """Starts a fresh per-class accumulator."""
        from mcad.evaluation.accumulator import AnomalyMetricAccumulator

        if not self.class_names:
            dm = getattr(self.trainer, "datamodule", None)
            self.class_names = list(getattr(dm, "class_names", []) or [])
        if not self.class_names:
            raise RuntimeError("The method has no class names: set module.class_names before testing.")
        acc = AnomalyMetricAccumulator(self.class_names, fpr_limit=self.protocol.fpr_limit)
        self._eval = {"accumulator": acc.to(self.device)}

    def test_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Maps -> protocol (under the batch's input geometry) -> accumulator.

        ``data.geometry=keep_aspect`` drops the padding and ``tile`` stitches every tile of an image before
        smoothing and scoring (:func:`mcad.evaluation.stitching.evaluate_batch`); the maps and masks the
        metrics see are on the protocol's evaluation grid.

        Returns the evaluated maps, masks and scores for callbacks (visualisation, W&B panels), with each
        image's ``content_map`` (the map before the resize to the grid), the input ``window`` it covers
        and the forward passes (``tiles``) it took.
        """
        evaluated = evaluate_batch(self.anomaly_maps, self.protocol, batch)
        assert evaluated.masks is not None
        self._eval["accumulator"].update(
            image_scores=evaluated.scores,
            labels=batch["label"],
            class_ids=batch["class_id"],
            indices=batch["index"],
            anomaly_maps=evaluated.pixel_maps,
            gt_masks=evaluated.masks,
        )
        return {
            "anomaly_map": evaluated.pixel_maps,
            "gt_mask": evaluated.masks,
            "score": evaluated.scores,
            "content_map": evaluated.content_maps,
            "window": evaluated.windows,
            "tiles": evaluated.tiles,
        }

    def on_test_epoch_end(self) -> None:
        """Computes the per-class table and logs ``test/<metric>`` and ``test/<class>/<metric>``."""
        acc = self._eval.pop("accumulator")
        results = acc.compute()
        metrics: dict[str, float] = {}
        for name, value in results["mean"].items():
            metrics[f"test/{name}"] = float(value)
        for cls, values in results["per_class"].items():
            for name, value in values.items():
                metrics[f"test/{cls}/{name}"] = float(value)
        finite = {k: v for k, v in metrics.items() if not math.isnan(v)}
        self.log_dict(finite, sync_dist=False, rank_zero_only=True)
        self.test_results = results
        acc.reset()

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Evaluated maps and image scores of a batch (no labels needed), under the batch's geometry.

        Returns ``anomaly_map`` (on the evaluation grid), ``score``, ``path``, and per image the
        ``content_map`` with its input ``window``, ``placement`` and ``tiles`` (see :meth:`test_step`), from
        which :func:`mcad.data.geometry.to_native` draws the map at the image's own resolution.
        """
        evaluated = evaluate_batch(self.anomaly_maps, self.protocol, {k: v for k, v in batch.items() if k != "mask"})
        placement = batch.get("placement")
        return {
            "anomaly_map": evaluated.pixel_maps.cpu(),
            "score": evaluated.scores.cpu(),
            "path": batch.get("path"),
            "content_map": [m.cpu() for m in evaluated.content_maps],
            "window": evaluated.windows.cpu(),
            "placement": placement.cpu() if isinstance(placement, Tensor) else None,
            "tiles": evaluated.tiles,
        }

    # ---------------------------------------------------------------------------- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts of the whole method (frozen backbone included)."""
        params = list(self.parameters())
        return {
            "params_total": sum(p.numel() for p in params),
            "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        }
