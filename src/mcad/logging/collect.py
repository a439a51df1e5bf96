"""Keeps the evaluated maps of a few selected test images, and per-class map statistics, during a test loop.

Shared by the PNG visualiser and the W&B panels. Only the selected images are kept (a bounded heap per
class and kind), so memory does not grow with the test set. Selections:

* ``worst``: per class the normal images with the *highest* scores and the anomalous images with the
  *lowest* scores (the ones a threshold would get wrong first);
* ``top``: per class the highest-scored images, whatever their label;
* ``first``: per class the first normal and anomalous images in test-set order (a fixed set, the same for
  every method and run on the same data);
* ``chosen``: images whose path contains one of the given strings (e.g. ``bottle/test/broken_large/000``).

Each kept image holds its arrays on the evaluation grid (``image``, ``gt_mask``, ``anomaly_map``: what the
metrics saw; the image cut to the window the map covers, i.e. without ``keep_aspect`` padding) and, when
the test step provides them, what is needed to draw it at its own resolution
(:meth:`Sample.native`): its content map, the input window it covers and its placement.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcad.data.geometry import Placement, to_native
from mcad.data.io import load_image, load_mask
from mcad.logging.render import denormalize

SELECTIONS = ("worst", "top", "first", "chosen")


@dataclass
class Sample:
    """One kept test image with its evaluated map and ground truth (arrays at the evaluation size)."""

    index: int
    path: str
    class_name: str
    label: int
    defect_type: str
    score: float
    image: np.ndarray
    gt_mask: np.ndarray
    anomaly_map: np.ndarray
    content_map: np.ndarray | None = None
    window: tuple[int, int, int, int] | None = None
    placement: Placement | None = None
    mask_path: str = ""

    @property
    def kind(self) -> str:
        """``normal`` or ``anomalous``."""
        return "anomalous" if self.label else "normal"

    def caption(self) -> str:
        """``class | defect | score``."""
        return f"{self.class_name} | {self.defect_type} | score {self.score:.4g}"

    def stem(self) -> str:
        """A file-name stem naming the image (defect folder and file name)."""
        return f"{self.defect_type}_{Path(self.path).stem}".replace("/", "_")

    def native(self, fill: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(image, gt_mask, anomaly_map)`` at the image file's own resolution, or ``None`` if unknown.

        The image and the ground truth are decoded from their files; the map is the content map brought
        back by the inverse input transform (:func:`mcad.data.geometry.to_native`; ``fill`` for pixels a
        centre crop hid from the model, default the map's minimum).
        """
        if self.content_map is None or self.window is None or self.placement is None:
            return None
        amap = to_native(self.content_map, self.window, self.placement, fill)
        image = load_image(self.path)
        gt = (load_mask(self.mask_path) > 0).astype(np.uint8) if self.mask_path else np.zeros(amap.shape, np.uint8)
        return image, gt, amap


class MapCollector:
    """Selects test images batch by batch and tracks per-class map ranges and normal maxima.

    Args:
        select: ``worst``, ``top``, ``first`` or ``chosen`` (see the module docstring).
        normal_per_class: Normal images kept per class (``worst``, ``first``).
        anomalous_per_class: Anomalous images kept per class (``worst``, ``first``); for ``top`` the
            two counts are summed.
        images: Path fragments of the images to keep (``chosen``).
    """

    def __init__(
        self,
        select: str = "worst",
        normal_per_class: int = 2,
        anomalous_per_class: int = 2,
        images: Sequence[str] | None = None,
    ) -> None:
        if select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got '{select}'.")
        if select == "chosen" and not images:
            raise ValueError("select=chosen needs a list of image path fragments (images=[...]).")
        self.select = select
        self.limits = {"normal": int(normal_per_class), "anomalous": int(anomalous_per_class)}
        self.images = [str(i) for i in images or []]
        self.reset()

    def reset(self) -> None:
        """Forgets everything (start of a test loop)."""
        self._heaps: dict[tuple[str, str], list[tuple[float, int, Sample]]] = defaultdict(list)
        self._counter = itertools.count()
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.normal_max: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------------------------ selection
    def _bucket(self, label: int) -> tuple[str, int]:
        if self.select == "top":
            return "all", self.limits["normal"] + self.limits["anomalous"]
        kind = "anomalous" if label else "normal"
        return kind, self.limits[kind] if self.select != "chosen" else 1 << 30

    def _priority(self, label: int, score: float, index: int) -> float:
        """Larger = more wanted; the heap keeps the largest priorities."""
        if self.select == "worst":
            return -score if label else score
        if self.select == "top":
            return score
        return -float(index)  # first (and chosen): test-set order

    def _wanted(self, path: str) -> bool:
        return self.select != "chosen" or any(fragment in path for fragment in self.images)

    def update(self, batch: dict[str, Any], outputs: dict[str, torch.Tensor] | None, mean: Sequence[float],
               std: Sequence[float]) -> None:  # fmt: skip
        """Takes one test batch and the ``test_step`` outputs (``anomaly_map``, ``gt_mask``, ``score``)."""
        if not outputs or "anomaly_map" not in outputs:
            return
        maps = outputs["anomaly_map"].detach().float().cpu()
        masks = outputs["gt_mask"].detach().cpu()
        scores = outputs["score"].detach().double().cpu()
        size = tuple(maps.shape[-2:])
        windows = outputs.get("window")
        content = outputs.get("content_map")
        placements = batch.get("placement")
        for i in range(maps.shape[0]):
            cls = str(batch["class_name"][i])
            label = int(batch["label"][i])
            amap = maps[i]
            lo, hi = float(amap.min()), float(amap.max())
            self.low[cls] = min(self.low.get(cls, lo), lo)
            self.high[cls] = max(self.high.get(cls, hi), hi)
            if label == 0:
                self.normal_max[cls].append(hi)
            path = str(batch["path"][i])
            if not self._wanted(path):
                continue
            bucket, limit = self._bucket(label)
            score = float(scores[i])
            index = int(batch["index"][i])
            priority = self._priority(label, score, index)
            heap = self._heaps[(cls, bucket)]
            if len(heap) >= limit and priority <= heap[0][0]:
                continue
            window: tuple[int, int, int, int] | None = None
            if windows is not None:  # (top, bottom, left, right) per sample
                top, bottom, left, right = (int(v) for v in windows[i].tolist())
                window = (top, bottom, left, right)
            image = batch["image"][i]
            if window is not None:  # the part of the input the map covers (no keep_aspect padding)
                image = image[:, window[0] : window[1], window[2] : window[3]]
            sample = Sample(
                index=index,
                path=path,
                class_name=cls,
                label=label,
                defect_type=str(batch.get("defect_type", ["?"] * maps.shape[0])[i]),
                score=score,
                image=denormalize(image, mean, std, size),
                gt_mask=masks[i].numpy().astype(np.uint8),
                anomaly_map=amap.numpy().copy(),
                content_map=content[i].detach().float().cpu().numpy().copy() if content is not None else None,
                window=window,
                placement=Placement.from_tensor(placements[i]) if placements is not None else None,
                mask_path=str(batch.get("mask_path", [""] * maps.shape[0])[i]),
            )
            entry = (priority, next(self._counter), sample)
            if len(heap) < limit:
                heapq.heappush(heap, entry)
            else:
                heapq.heapreplace(heap, entry)

    # ------------------------------------------------------------------------------------ results
    def classes(self) -> list[str]:
        """Classes seen, in order of first appearance."""
        return list(self.low)

    def samples(self, cls: str) -> list[Sample]:
        """Kept images of a class, most wanted first (anomalous before normal)."""
        out = []
        for bucket in ("anomalous", "all", "normal"):
            heap = self._heaps.get((cls, bucket), [])
            out += [s for _, _, s in sorted(heap, key=lambda e: (-e[0], e[1]))]
        return out

    def value_range(self, cls: str) -> tuple[float, float]:
        """Lowest and highest map value of the class over the whole test loop (the heat-map scale)."""
        return self.low.get(cls, 0.0), self.high.get(cls, 1.0)

    def normal_threshold(self, cls: str) -> float | None:
        """The highest map value reached by any normal test image of the class (``None`` without one)."""
        values = self.normal_max.get(cls)
        return max(values) if values else None
