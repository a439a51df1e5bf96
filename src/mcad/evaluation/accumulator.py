"""Per-class, DDP-correct accumulator of the seven anomaly-detection metrics.

The accumulator stores per-sample results (image score, label, class id, test-set index and, for pixel
metrics, the post-processed anomaly map and the binarised ground-truth mask) and computes the exact
metrics of :mod:`mcad.metrics.functional` per class at :meth:`AnomalyMetricAccumulator.compute`.

Storage choice and error:

* maps are stored as ``float32`` by default: the metrics are then *exact* for the maps the method
  produced (no quantisation; the engine has no binning). ``map_dtype=torch.float16`` halves the memory
  but rounds scores to 11 significant bits, which creates ties and changes rankings; on the MVTec-sized
  case of ``experiments/bench_metrics.py`` it moves pixel metrics by up to 7.5e-4 (reported there as
  max |float16 - float32|), outside the 1e-4 guarantee, so it is opt-in. The metrics are still exact for
  the rounded maps. Values above 65504 overflow to ``inf`` in float16 (a warning is emitted).
* masks are stored as ``uint8`` {0, 1}, image scores as ``float64``, labels as ``uint8``.

No sigmoid or any other transformation is ever applied to the scores.

Distributed evaluation: torchmetrics gathers the list states with ``cat``. Samples that a distributed
sampler duplicated (to give every rank the same count) carry the same ``index``; after gathering, only
the first occurrence of each index is kept and samples are processed in ascending index order, so N
processes give bit-identical numbers to one process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torchmetrics
from torch import Tensor

from mcad.metrics._table import IMAGE_METRICS, METRIC_NAMES, PIXEL_METRICS, compute_metrics

__all__ = ["IMAGE_METRICS", "METRIC_NAMES", "PIXEL_METRICS", "AnomalyMetricAccumulator", "compute_metrics"]

_MAP_DTYPES = (torch.float32, torch.float16, torch.float64)


class AnomalyMetricAccumulator(torchmetrics.Metric):
    """Accumulates per-sample results and computes the per-class metric table (exact, DDP-correct).

    Example:
        >>> acc = AnomalyMetricAccumulator(["bottle", "cable"])
        >>> acc.update(scores, labels, class_ids, indices, maps, masks)  # once per test batch
        >>> table = acc.compute()  # {"per_class": {...}, "mean": {..., "mAD": ...}}

    Args:
        class_names: Category names; ``class_ids`` passed to :meth:`update` index into them.
        fpr_limit: AUPRO integration limit.
        map_dtype: Storage dtype of the maps: ``torch.float32`` (default, exact), ``torch.float16``
            (half the memory, rounds scores; opt-in) or ``torch.float64``.
        pixel_metrics: Store maps/masks and compute the pixel metrics (P-AUROC, P-AP, P-F1max, AUPRO).
        **kwargs: Forwarded to :class:`torchmetrics.Metric` (e.g. ``process_group``, or
            ``compute_on_cpu=True`` to keep the stored maps in host memory: fine for one process or a gloo
            group, but NCCL cannot gather CPU tensors).

    Memory: per stored pixel 4 bytes (float32 map) + 1 byte (mask). ``compute`` materialises one class at a
    time (~5 bytes per pixel of that class plus one sorted copy of its scores). Under DDP every rank
    receives the states of all ranks: during the gather it briefly holds its local states, one
    concatenated local copy, the gathered list and their concatenation (torchmetrics' ``cat`` sync).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    image_scores: list[Tensor]
    labels: list[Tensor]
    class_ids: list[Tensor]
    indices: list[Tensor]
    anomaly_maps: list[Tensor]
    gt_masks: list[Tensor]

    def __init__(
        self,
        class_names: Sequence[str],
        fpr_limit: float = 0.3,
        map_dtype: torch.dtype = torch.float32,
        pixel_metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if len(set(class_names)) != len(class_names) or not class_names:
            raise ValueError(f"class_names must be non-empty and unique, got {list(class_names)}")
        if map_dtype not in _MAP_DTYPES:
            raise ValueError(f"map_dtype must be one of {_MAP_DTYPES}, got {map_dtype}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.class_names = tuple(class_names)
        self.fpr_limit = float(fpr_limit)
        self.map_dtype = map_dtype
        self.pixel_metrics = bool(pixel_metrics)
        for name in ("image_scores", "labels", "class_ids", "indices"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        if self.pixel_metrics:
            self.add_state("anomaly_maps", default=[], dist_reduce_fx="cat")
            self.add_state("gt_masks", default=[], dist_reduce_fx="cat")

    def update(
        self,
        image_scores: Tensor,
        labels: Tensor,
        class_ids: Tensor,
        indices: Tensor,
        anomaly_maps: Tensor | None = None,
        gt_masks: Tensor | None = None,
    ) -> None:
        """Store one batch.

        Args:
            image_scores: ``(B,)`` float image scores, any real values.
            labels: ``(B,)`` int/bool image labels, 0 normal / 1 anomalous.
            class_ids: ``(B,)`` int, index into ``class_names``.
            indices: ``(B,)`` int, position of each sample in the test set (unique per sample).
            anomaly_maps: ``(B, H, W)`` (or ``(B, 1, H, W)``) post-processed maps at evaluation resolution;
                required when ``pixel_metrics`` is True, ignored otherwise.
            gt_masks: ``(B, H, W)`` (or ``(B, 1, H, W)``) binarised masks, bool or integer {0, 1}.

        Raises:
            ValueError: On inconsistent batch sizes/shapes, out-of-range class ids, non-binary labels or
                masks, or floating-point masks (binarise with the protocol's ``gt_threshold`` first).
        """
        scores = image_scores.detach().reshape(-1)
        b = scores.numel()
        lab = labels.detach().reshape(-1)
        cls = class_ids.detach().reshape(-1)
        idx = indices.detach().reshape(-1)
        if not (lab.numel() == cls.numel() == idx.numel() == b):
            raise ValueError(
                f"batch sizes differ: scores {b}, labels {lab.numel()}, class_ids {cls.numel()}, indices {idx.numel()}"
            )
        if lab.is_floating_point() or cls.is_floating_point() or idx.is_floating_point():
            raise ValueError("labels, class_ids and indices must be integer (or bool) tensors")
        if b and ((lab != 0) & (lab != 1)).any():
            raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
        if b and (cls.min() < 0 or cls.max() >= len(self.class_names)):
            raise ValueError(f"class_ids must be in [0, {len(self.class_names)})")
        self.image_scores.append(scores.to(torch.float64))
        self.labels.append(lab.to(torch.uint8))
        self.class_ids.append(cls.to(torch.int64))
        self.indices.append(idx.to(torch.int64))
        if not self.pixel_metrics:
            return
        if anomaly_maps is None or gt_masks is None:
            raise ValueError("anomaly_maps and gt_masks are required when pixel_metrics=True")
        maps = self._spatial(anomaly_maps.detach(), b, "anomaly_maps")
        masks = self._spatial(gt_masks.detach(), b, "gt_masks")
        if maps.shape != masks.shape:
            raise ValueError(f"anomaly_maps {tuple(maps.shape)} and gt_masks {tuple(masks.shape)} differ")
        if self.anomaly_maps and self.anomaly_maps[0].shape[1:] != maps.shape[1:]:
            raise ValueError(
                f"map size {tuple(maps.shape[1:])} differs from earlier batches "
                f"{tuple(self.anomaly_maps[0].shape[1:])}; evaluate at one resolution"
            )
        if masks.is_floating_point():
            raise ValueError("gt_masks must be bool or integer {0, 1}; binarise with the protocol's gt_threshold")
        if masks.dtype != torch.bool and masks.numel() and (masks.min() < 0 or masks.max() > 1):
            raise ValueError("gt_masks must contain only 0 and 1")
        # Own contiguous copies: never keep a view that would pin a larger caller buffer alive.
        stored = torch.empty(maps.shape, dtype=self.map_dtype, device=maps.device)
        stored.copy_(maps)
        if self.map_dtype == torch.float16 and torch.isinf(stored).any() and not torch.isinf(maps).any():
            warnings.warn(
                "anomaly map values exceed the float16 range (65504) and were stored as inf; "
                "use map_dtype=torch.float32",
                stacklevel=2,
            )
        self.anomaly_maps.append(stored)
        self.gt_masks.append(masks.to(torch.uint8, copy=True).contiguous())

    @staticmethod
    def _spatial(x: Tensor, b: int, name: str) -> Tensor:
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.shape[0] != b:
            raise ValueError(f"{name} must be (B, H, W) or (B, 1, H, W) with B={b}, got {tuple(x.shape)}")
        return x

    def compute(self) -> dict[str, Any]:
        """Per-class table, class means and mAD over the de-duplicated test set.

        Returns:
            ``{"per_class": {class_name: {metric_name: float, "mAD": float}},
            "mean": {metric_name: float, "mAD": float}}`` with the metric names of :data:`METRIC_NAMES`.
            Classes without test samples are omitted; the mean is unweighted over the classes present. With
            ``pixel_metrics=False`` only the image metrics are reported and there is no ``mAD``. Undefined
            values are NaN (with a warning naming the class and metric).
        """
        return compute_metrics(
            self.image_scores,
            self.labels,
            self.class_ids,
            self.class_names,
            anomaly_maps=self.anomaly_maps if self.pixel_metrics else None,
            gt_masks=self.gt_masks if self.pixel_metrics else None,
            indices=self.indices,
            fpr_limit=self.fpr_limit,
        )

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update`: per-batch values of these dataset-level metrics are meaningless."""
        self.update(*args, **kwargs)

    def _copy_state_dict(self) -> dict[str, Any]:
        # torchmetrics caches a *deep* copy of the states before a DDP sync to restore them afterwards.
        # Stored tensors are never modified in place here, so sharing them avoids one full copy of all
        # local maps during compute.
        return {
            attr: list(val) if isinstance(val, list) else val.detach().clone()
            for attr, val in ((a, getattr(self, a)) for a in self._defaults)
        }
