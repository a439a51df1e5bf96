"""W&B dashboards (``logger=wandb``): run grouping and tags, per-class table, map overlays, curves, efficiency.

What a run shows (everything also works with ``WANDB_MODE=offline``):

* config: the resolved config (``log_hyperparams`` in :func:`mcad.train.train`);
* ``train/<loss>`` per step and epoch, ``test/<metric>`` and ``test/<class>/<metric>`` (the base module);
* ``test/per_class``: a table of the seven metrics and mAD per class plus the mean row;
* ``test/anomaly_maps``: overlays (image | ground truth | heat map | thresholded map) of a fixed set of test
  images: per class the first ``anomalous_per_class`` anomalous and ``normal_per_class`` normal images in
  test-set order, so panels of different runs on the same data show the same images;
* ``test/curves/image_roc``, ``test/curves/pixel_roc``, ``test/curves/pro``: one line per class. The pixel
  curves use every ``curve_stride``-th row and column of the evaluated maps (a uniform pixel subsample,
  to bound memory); the metrics themselves are always exact;
* ``efficiency/<figure>`` in the summary and an ``efficiency`` table (parameters, FLOPs, images/s, memory).

Runs of one sweep share the group ``<sweep dir>`` and carry the tags ``method=...``, ``data=...``,
``backbone=...``, ``experiment=...`` (:func:`wandb_logger_settings`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig

from mcad.evaluation.results import METRIC_COLUMNS
from mcad.logging.collect import MapCollector
from mcad.logging.curves import pro_curve_points, roc_curve_points
from mcad.logging.render import panel
from mcad.logging.visualize import normalisation

log = logging.getLogger(__name__)

WANDB_TARGET = "lightning.pytorch.loggers.WandbLogger"
TAG_GROUPS = ("method", "data", "backbone", "experiment")


def is_wandb_node(node: Any) -> bool:
    """Whether a logger config node builds Lightning's W&B logger."""
    return bool(node) and str(node.get("_target_", "")).endswith("WandbLogger")


def wandb_logger_settings(cfg: DictConfig, node: DictConfig) -> dict[str, Any]:
    """Group, tags, name and job type of the W&B run of this job (empty for other loggers).

    Values set in the logger config win: ``group`` when non-empty, ``tags`` are extended, ``name`` when
    set. Automatic values: the group of a multirun job is its sweep directory (shared by every job of the
    sweep, whatever the launcher), the tags are the chosen ``method``/``data``/``backbone``/``experiment``
    options, the name of a multirun job is its override string, the job type is ``task_name``.
    """
    if not is_wandb_node(node):
        return {}
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    choices: dict[str, Any] = {}
    group = name = None
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        choices = dict(hc.runtime.choices)
        if hc.mode == RunMode.MULTIRUN:
            group = str(Path(str(hc.sweep.dir)))
            name = f"{hc.job.num}:{hc.job.override_dirname}"[:128] if hc.job.override_dirname else None
    tags = [str(t) for t in (node.get("tags") or [])]
    for key in TAG_GROUPS:
        value = choices.get(key)
        if value is not None and str(value) != "null":
            tags.append(f"{key}={value}"[:64])
    settings: dict[str, Any] = {"tags": list(dict.fromkeys(tags)), "job_type": str(cfg.get("task_name", "train"))}
    if node.get("group"):
        settings["group"] = str(node.group)
    elif group:
        settings["group"] = group
    if not node.get("name") and name:
        settings["name"] = name
    return settings


def _wandb_logger(trainer: L.Trainer) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger
    return None


class WandbPanels(L.Callback):
    """Logs the per-class table, map overlays, curves and efficiency figures to the run's W&B logger.

    Args:
        normal_per_class: Normal test images per class in the overlay panel.
        anomalous_per_class: Anomalous test images per class in the overlay panel.
        curve_stride: Pixel curves use every ``curve_stride``-th row and column of the maps.
        max_curve_points: Points drawn per curve.
        log_images: Log the overlay panel.
        log_curves: Log the ROC and PRO curves.
        finish: End the W&B run after the results are logged (so that the next job of a sweep run in the
            same process starts its own run).

    Does nothing when the trainer has no :class:`~lightning.pytorch.loggers.WandbLogger`. Under DDP the
    overlays and curves come from global rank 0's share of the test set.
    """

    def __init__(
        self,
        normal_per_class: int = 1,
        anomalous_per_class: int = 2,
        curve_stride: int = 4,
        max_curve_points: int = 200,
        log_images: bool = True,
        log_curves: bool = True,
        finish: bool = True,
    ) -> None:
        self.collector = MapCollector("first", normal_per_class, anomalous_per_class)
        self.curve_stride = max(1, int(curve_stride))
        self.max_curve_points = max_curve_points
        self.log_images, self.log_curves, self.finish = log_images, log_curves, finish
        self._reset()

    def _reset(self) -> None:
        self.collector.reset()
        self._classes: list[str] = []
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and _wandb_logger(trainer) is not None

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not self._active(trainer) or not outputs or "anomaly_map" not in outputs:
            return
        if self.log_images:
            mean, std = normalisation(trainer)
            self.collector.update(batch, outputs, mean, std)
        if self.log_curves:
            s = self.curve_stride
            self._classes += [str(c) for c in batch["class_name"]]
            self._scores.append(outputs["score"].detach().double().cpu().numpy())
            self._labels.append(np.asarray(batch["label"]).reshape(-1))
            self._maps.append(outputs["anomaly_map"][:, ::s, ::s].detach().float().cpu().numpy())
            self._masks.append(outputs["gt_mask"][:, ::s, ::s].detach().cpu().numpy().astype(np.uint8))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer):
            return
        import wandb

        run = _wandb_logger(trainer).experiment
        payload: dict[str, Any] = {}
        results = getattr(pl_module, "test_results", None)
        if results:
            payload["test/per_class"] = per_class_table(results)
        if self.log_images:
            images = []
            for cls in self.collector.classes():
                low, high = self.collector.value_range(cls)
                threshold = self.collector.normal_threshold(cls)
                for sample in self.collector.samples(cls):
                    image = panel(sample.image, sample.gt_mask, sample.anomaly_map, low, high, threshold)
                    images.append(wandb.Image(image, caption=f"{sample.caption()} | {Path(sample.path).name}"))
            if images:
                payload["test/anomaly_maps"] = images
        if self.log_curves and self._scores:
            fpr_limit = float(getattr(getattr(pl_module, "protocol", None), "fpr_limit", 0.3))
            payload.update(self._curves(fpr_limit))
        if payload:
            run.log(payload)
        self._reset()

    def _curves(self, fpr_limit: float) -> dict[str, Any]:
        import wandb

        classes = np.asarray(self._classes)
        scores, labels = np.concatenate(self._scores), np.concatenate(self._labels)
        maps, masks = np.concatenate(self._maps), np.concatenate(self._masks)
        curves: dict[str, tuple[list, list, list]] = {"image_roc": ([], [], []), "pixel_roc": ([], [], []),
                                                       "pro": ([], [], [])}  # fmt: skip
        for cls in dict.fromkeys(self._classes):
            sel = classes == cls
            for key, points in (
                ("image_roc", roc_curve_points(scores[sel], labels[sel], self.max_curve_points)),
                ("pixel_roc", roc_curve_points(maps[sel], masks[sel], self.max_curve_points)),
                ("pro", pro_curve_points(maps[sel], masks[sel], fpr_limit, self.max_curve_points)),
            ):
                if points is not None:
                    curves[key][0].append(points[0])
                    curves[key][1].append(points[1])
                    curves[key][2].append(cls)
        titles = {"image_roc": ("Image ROC", "TPR"), "pixel_roc": ("Pixel ROC", "TPR"),
                  "pro": (f"PRO (FPR <= {fpr_limit:g})", "PRO")}  # fmt: skip
        out = {}
        for key, (xs, ys, keys) in curves.items():
            if xs:
                title, yname = titles[key]
                out[f"test/curves/{key}"] = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title, xname="FPR")
        return out

    def on_results(self, trainer: L.Trainer, results: dict[str, Any]) -> None:
        """Called by the training entry point once ``results.json`` is written: efficiency, then finish."""
        logger = _wandb_logger(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        import wandb

        run = logger.experiment
        figures = {k: v for k, v in (results.get("efficiency") or {}).items() if isinstance(v, int | float)}
        run.summary.update({f"efficiency/{k}": v for k, v in figures.items()})
        table = wandb.Table(columns=["figure", "value"], data=[[k, float(v)] for k, v in figures.items()])
        run.log({"efficiency": table})
        if self.finish:
            run.finish()


def per_class_table(results: dict[str, Any]) -> Any:
    """A ``wandb.Table`` of the metrics per class plus the mean row."""
    import wandb

    mean = results.get("mean") or {}
    per_class = results.get("per_class") or {}
    columns = [c for c in METRIC_COLUMNS if c in mean or any(c in v for v in per_class.values())]
    rows = [[cls, *(_num(values.get(c)) for c in columns)] for cls, values in per_class.items()]
    rows.append(["mean", *(_num(mean.get(c)) for c in columns)])
    return wandb.Table(columns=["class", *columns], data=rows)


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if value != value else value
