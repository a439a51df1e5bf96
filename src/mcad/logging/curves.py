"""ROC and PRO curve points of a test loop: for the W&B panels and for ``<run>/curves.json``.

* :func:`roc_curve_points`, :func:`pro_curve_points`: plot points as lists (:mod:`mcad.metrics`' exact
  curves, thinned for drawing);
* :class:`CurveRecorder`: a callback that collects, for any method, what the points need during testing
  and computes the per-class points that :func:`~mcad.evaluation.curves.write_curves` stores (the file's
  format and reader are in :mod:`mcad.evaluation.curves`, re-exported here).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch

from mcad.evaluation.curves import (
    CURVE_KINDS,
    CURVES_FILE,
    CURVES_FORMAT,
    MAX_POINTS,
    Points,
    class_curve_points,
    read_curves,
    write_curves,
)
from mcad.metrics import pro_points, roc_points

__all__ = [
    "CURVES_FILE",
    "CURVES_FORMAT",
    "CURVE_KINDS",
    "MAX_POINTS",
    "CurveRecorder",
    "class_curve_points",
    "pro_curve_points",
    "read_curves",
    "roc_curve_points",
    "write_curves",
]


def roc_curve_points(scores: np.ndarray, labels: np.ndarray, max_points: int = MAX_POINTS) -> tuple[list, list] | None:
    """``(fpr, tpr)`` lists of the ROC curve of any scores, or ``None`` if one class is absent."""
    points = roc_points(scores, labels, max_points)
    return None if points is None else (points[0].tolist(), points[1].tolist())


def pro_curve_points(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3,
                     max_points: int = MAX_POINTS) -> tuple[list, list] | None:  # fmt: skip
    """``(fpr, pro)`` lists of the per-region-overlap curve up to ``fpr_limit``, or ``None`` without regions.

    Args:
        maps: ``(N, H, W)`` evaluated maps.
        masks: ``(N, H, W)`` binary ground truth.
        fpr_limit: Last FPR of the curve (the AUPRO integration limit).
        max_points: Points kept for drawing.
    """
    points = pro_points(maps, masks, fpr_limit, max_points)
    return None if points is None else (points[0].tolist(), points[1].tolist())


class CurveRecorder(L.Callback):
    """Collects the test loop's scores (and subsampled maps) and computes the per-class curve points.

    Method-independent: it reads only what every method's ``test_step`` returns (``score``, and
    ``anomaly_map`` / ``gt_mask`` at the evaluation size) and the batch's ``label``, ``class_name`` and
    ``index``. After testing, :attr:`points` holds ``{class: {kind: (x, y)}}`` for :func:`write_curves`.

    Args:
        pixel_stride: Pixel ROC / PRO curves from every ``pixel_stride``-th row and column of the maps (a
            uniform subsample: 1/16 of the memory at 4; 1 keeps every pixel, i.e. the exact pixel curves);
            ``None`` records the image ROC only.
        max_points: Points kept per curve.
        output_dir: If given, :func:`write_curves` writes ``curves.json`` there at the end of testing.

    Under DDP the samples of all processes are gathered (duplicates a distributed sampler added are
    dropped by test-set index), so the curves are those of the whole test set.
    """

    def __init__(self, pixel_stride: int | None = 4, max_points: int = MAX_POINTS, output_dir: str | None = None):
        self.pixel_stride = None if pixel_stride is None else max(1, int(pixel_stride))
        self.max_points = int(max_points)
        self.output_dir = output_dir
        self.fpr_limit = 0.3
        self.points: dict[str, dict[str, Points]] = {}
        self._reset()

    def _reset(self) -> None:
        self._classes: list[str] = []
        self._indices: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._maps: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.points = {}
        self.fpr_limit = float(getattr(getattr(pl_module, "protocol", None), "fpr_limit", 0.3))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if not outputs or "score" not in outputs:
            return
        scores = outputs["score"].detach().double().cpu().numpy().reshape(-1)
        self._scores.append(scores)
        self._labels.append(np.asarray(torch.as_tensor(batch["label"]).cpu()).reshape(-1).astype(np.uint8))
        self._classes += [str(c) for c in batch["class_name"]]
        index = batch.get("index")
        self._indices.append(np.asarray(torch.as_tensor(index).cpu()).reshape(-1) if index is not None else
                             np.full(scores.size, -1, dtype=np.int64))  # fmt: skip
        if self.pixel_stride is not None and "anomaly_map" in outputs and "gt_mask" in outputs:
            s = self.pixel_stride
            maps, masks = outputs["anomaly_map"].detach(), outputs["gt_mask"].detach()
            if maps.ndim == 4:  # (B, 1, H, W)
                maps, masks = maps[:, 0], masks[:, 0]
            # A copy: a strided view would keep every batch's full-resolution maps alive.
            self._maps.append(maps[:, ::s, ::s].float().cpu().numpy().copy())
            self._masks.append(masks[:, ::s, ::s].cpu().numpy().astype(np.uint8))

    def _gathered(self, trainer: L.Trainer) -> tuple[list, ...] | None:
        """Every process's samples on global rank 0 (``None`` elsewhere)."""
        local = (self._classes, self._indices, self._scores, self._labels, self._maps, self._masks)
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return local
        # Scores are a few numbers per image and the maps are subsampled: object gathering is cheap enough.
        parts: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(parts, local)
        if not trainer.is_global_zero:
            return None
        return tuple([item for part in parts for item in part[k]] for k in range(len(local)))

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gathered = self._gathered(trainer)
        self._reset()
        if gathered is None or not gathered[2]:
            return
        classes, indices, score_parts, label_parts, maps, masks = gathered
        names, index = np.asarray(classes), np.concatenate(indices)
        scores, labels = np.concatenate(score_parts), np.concatenate(label_parts)
        pixel = bool(maps) and sum(m.shape[0] for m in maps) == names.size
        maps_all = np.concatenate(maps) if pixel else None
        masks_all = np.concatenate(masks) if pixel else None
        if (index >= 0).all():
            # First occurrence of each test-set index, in test-set order (as the metric accumulator does).
            _, keep = np.unique(index, return_index=True)
            names, scores, labels = names[keep], scores[keep], labels[keep]
            if maps_all is not None and masks_all is not None:  # both set iff pixel
                maps_all, masks_all = maps_all[keep], masks_all[keep]
        self.points = class_curve_points(names, scores, labels, maps_all, masks_all, self.fpr_limit, self.max_points)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.output_dir and self.points and trainer.is_global_zero:
            write_curves(self.output_dir, self.points, self.fpr_limit, self.pixel_stride, self.max_points)
