"""PNG overlays of test images without W&B: ``visualize=true`` (or ``callbacks=visualize``).

For each class, a few test images (the worst-scored by default, or chosen ones) are written as one PNG each
into ``<run>/visualizations/<class>/``: image | ground truth | anomaly-map heat map | thresholded map. An
``index.csv`` beside them lists image, label, score, threshold and the height and width of the tiles per file.

Resolution (``resolution``): ``native`` (default) draws every tile at the image file's own resolution and
aspect: the image and its ground truth decoded from their files, the map brought back with the inverse of
the input transform (:func:`mcad.data.geometry.to_native`: crop, padding and resize of ``data.geometry``
undone); ``eval`` draws the arrays the metrics saw, on the protocol's evaluation grid.

Scale and threshold, per class (the evaluated maps of different classes live on different scales):

* the heat map runs from the lowest to the highest map value of the class's test images (blue to red);
* the thresholded tile marks the pixels above ``threshold`` if it is given, else above the highest map value
  that any *normal* test image of the class reaches (so every highlighted pixel scores higher than all
  normal pixels of that class). This is a display choice, not an evaluated operating point.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from mcad.logging.collect import MapCollector
from mcad.logging.render import panel, write_png
from mcad.utils.files import atomic_write_text

log = logging.getLogger(__name__)

RESOLUTIONS = ("native", "eval")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalisation(trainer: L.Trainer) -> tuple[Sequence[float], Sequence[float]]:
    """The data module's normalisation (to draw the images), ImageNet's if it has none."""
    dm = getattr(trainer, "datamodule", None)
    mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
    return (mean or IMAGENET_MEAN), (std or IMAGENET_STD)


class AnomalyMapVisualizer(L.Callback):
    """Writes PNG overlays of selected test images at the end of testing.

    Args:
        output_dir: Folder of the PNGs (``<run>/visualizations``).
        select: ``worst`` (normal images with the highest and anomalous images with the lowest scores),
            ``top`` (highest scores), ``first`` (test-set order) or ``chosen`` (``images``).
        num_per_class: Images per class (``worst``/``first``: split between anomalous and normal images,
            the odd one to the anomalous side).
        images: Path fragments of chosen images (e.g. ``[bottle/test/broken_large/000]``); given, they
            override ``select``.
        threshold: Fixed map threshold of the last tile; ``None`` = per class, the highest map value of its
            normal test images.
        resolution: ``native`` (each image's own size) or ``eval`` (the evaluation grid).

    Under DDP each process sees only its share of the test set; the files come from global rank 0's share.
    """

    def __init__(
        self,
        output_dir: str,
        select: str = "worst",
        num_per_class: int = 4,
        images: list[str] | None = None,
        threshold: float | None = None,
        resolution: str = "native",
    ) -> None:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, got '{resolution}'.")
        self.resolution = resolution
        self.output_dir = Path(output_dir)
        anomalous = (num_per_class + 1) // 2
        self.collector = MapCollector(
            select="chosen" if images else select,
            normal_per_class=num_per_class - anomalous,
            anomalous_per_class=anomalous,
            images=images,
        )
        self.threshold = threshold
        self.written: list[Path] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.collector.reset()
        self.written = []

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:  # fmt: skip
        if trainer.is_global_zero:
            mean, std = normalisation(trainer)
            self.collector.update(batch, outputs, mean, std)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows: list[list[object]] = [
            ["file", "class", "path", "label", "defect_type", "score", "threshold", "height", "width"]
        ]
        for cls in self.collector.classes():
            low, high = self.collector.value_range(cls)
            threshold = self.threshold if self.threshold is not None else self.collector.normal_threshold(cls)
            for rank, sample in enumerate(self.collector.samples(cls)):
                drawn = sample.native(fill=low) if self.resolution == "native" else None
                picture, gt, amap = drawn or (sample.image, sample.gt_mask, sample.anomaly_map)
                image = panel(picture, gt, amap, low, high, threshold, sample.caption())
                path = self.output_dir / cls / f"{rank:02d}_{sample.kind}_{sample.stem()}.png"
                write_png(path, image)
                self.written.append(path)
                shown = "" if threshold is None else f"{threshold:.6g}"
                rows.append([str(path.relative_to(self.output_dir)), cls, sample.path, sample.label,
                             sample.defect_type, f"{sample.score:.6g}", shown, *amap.shape[:2]])  # fmt: skip
        if self.written:
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            atomic_write_text(self.output_dir / "index.csv", buf.getvalue())
            log.info("Wrote %d anomaly-map overlays to %s", len(self.written), self.output_dir)
