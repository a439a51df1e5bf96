"""The base LightningModule of every method: the shared test path and training-step plumbing.

A method implements two things:

* ``training_losses(batch) -> dict`` with a ``loss`` entry (or its own ``training_step`` under
  manual optimisation, calling :meth:`AnomalyModule.check_losses` and :meth:`log_losses`);
* ``anomaly_maps(images) -> AnomalyMaps``: raw maps, higher = more anomalous.

Everything after the maps (upsampling, fusion with a segmentation map, smoothing, image scores,
ground-truth binarisation, per-class metric accumulation, logging) happens here, identically for
every method, under the run's :class:`~mcad.evaluation.protocol.EvalProtocol`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from mcad.evaluation.protocol import EvalProtocol

log = logging.getLogger(__name__)


@dataclass
class AnomalyMaps:
    """A method's raw output for a batch of images.

    Attributes:
        anomaly_map: ``(B, 1, h, w)`` anomaly scores at any resolution (unbounded).
        segmentation: Optional ``(B, 1, h', w')`` anomaly probability from a segmentation head.
    """

    anomaly_map: Tensor
    segmentation: Tensor | None = None


class LossPlugin(nn.Module):
    """A loss that adds terms to any method's own objective (``loss=ccl`` on RD, RLR or CRR).

    A method receives it through its ``loss`` argument; the base class keeps it apart from the
    method's reconstruction loss and adds its terms in :meth:`AnomalyModule.training_step`. A plug-in
    reads what it needs through the method's feature hooks (:meth:`AnomalyModule.dense_features`,
    :meth:`AnomalyModule.global_embedding`) and may ask the data layer for extra inputs.
    """

    def configure_datamodule(self, datamodule: Any) -> None:
        """Asks the data layer for what the plug-in needs (extra views, a sampler...)."""

    def setup(self, method: AnomalyModule) -> None:
        """One-off preparation at the start of training, e.g. checking the classes or computing pseudo labels.

        Called by :meth:`AnomalyModule.on_fit_start`: the data module is set up, loaders are not built yet.
        """

    def extra_results(self) -> dict[str, Any]:
        """Entries the plug-in adds to ``results.json`` (e.g. how well pseudo labels match the classes)."""
        return {}

    def forward(self, method: AnomalyModule, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Extra loss terms for a training batch (each is added to the total)."""
        raise NotImplementedError


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or Inf."""


class AnomalyModule(L.LightningModule):
    """Base class of all methods.

    Args:
        protocol: Evaluation protocol (dataclass or its fields as a mapping).
        on_nonfinite: ``raise`` (stop with the step and the batch's paths) or ``skip`` the batch.
        loss: The method's loss module from the ``loss`` config group, or a :class:`LossPlugin`
            (then ``default_loss`` builds the method's own loss and the plug-in adds its terms).
        default_loss: Builds the method's own loss when ``loss`` is ``None`` or a plug-in.
    """

    def __init__(
        self,
        protocol: EvalProtocol | dict | None = None,
        on_nonfinite: str = "raise",
        loss: nn.Module | None = None,
        default_loss: Any = None,
    ) -> None:
        super().__init__()
        self.loss_plugin: LossPlugin | None = loss if isinstance(loss, LossPlugin) else None
        if isinstance(loss, LossPlugin) or loss is None:
            loss = default_loss() if default_loss is not None else None
        self.loss_fn = loss
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

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Losses of a training batch with the total under ``loss`` (subclasses implement)."""
        raise NotImplementedError

    def dense_features(self, images: Tensor) -> list[Tensor]:
        """Learned dense features ``[(B, C_i, h_i, w_i), ...]`` of a batch, with gradients.

        Used by loss plug-ins such as CCL's dense term.
        """
        raise NotImplementedError(f"{type(self).__name__} does not expose dense features.")

    def global_embedding(self, images: Tensor) -> Tensor:
        """A ``(B, D)`` global embedding of a batch, with gradients (CCL's global term)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose a global embedding.")

    def correspondence_features(self, images: Tensor) -> list[Tensor] | None:
        """Frozen dense features matching :meth:`dense_features` level by level, or ``None``.

        They are used to match locations between two views (CCL's dense term: a teacher's maps, at the
        resolutions of the dense features); ``None`` (default) lets the plug-in match on the dense
        features themselves.
        """
        return None

    def configure_datamodule(self, datamodule: Any) -> None:
        """Lets the method and its loss plug-in ask the data layer for extra inputs."""
        if self.loss_plugin is not None:
            self.loss_plugin.configure_datamodule(datamodule)

    def on_fit_start(self) -> None:
        """Runs the loss plug-in's one-off preparation (subclasses overriding this call ``super()``)."""
        if self.loss_plugin is not None:
            self.loss_plugin.setup(self)

    def extra_results(self) -> dict[str, Any]:
        """Method- or plug-in-specific entries that the training entry point adds to ``results.json``."""
        return self.loss_plugin.extra_results() if self.loss_plugin is not None else {}

    # ---------------------------------------------------------------------------- training plumbing
    def check_losses(self, losses: dict[str, Tensor], batch: dict[str, Any]) -> bool:
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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        """Computes, checks and logs the losses; returns the total (``None`` skips the batch)."""
        losses = self.training_losses(batch)
        if self.loss_plugin is not None:
            extra = self.loss_plugin(self, batch)
            losses = {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}
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

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Maps -> protocol -> accumulator.

        Returns the evaluated maps, masks and scores for callbacks (visualisation, W&B panels).
        """
        out = self.anomaly_maps(batch["image"])
        pixel_maps, scores = self.protocol.process(out.anomaly_map, out.segmentation)
        masks = self.protocol.binarize_masks(batch["mask"])
        self._eval["accumulator"].update(
            image_scores=scores,
            labels=batch["label"],
            class_ids=batch["class_id"],
            indices=batch["index"],
            anomaly_maps=pixel_maps,
            gt_masks=masks,
        )
        return {"anomaly_map": pixel_maps, "gt_mask": masks, "score": scores}

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

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Evaluated maps and image scores of a batch (no labels needed)."""
        out = self.anomaly_maps(batch["image"])
        pixel_maps, scores = self.protocol.process(out.anomaly_map, out.segmentation)
        return {"anomaly_map": pixel_maps.cpu(), "score": scores.cpu(), "path": batch.get("path")}

    # ---------------------------------------------------------------------------- bookkeeping
    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameter counts of the whole method (frozen backbone included)."""
        params = list(self.parameters())
        return {
            "params_total": sum(p.numel() for p in params),
            "params_trainable": sum(p.numel() for p in params if p.requires_grad),
        }
