"""MVTec-AD-layout datasets: MVTec AD itself and any folder in the same layout.

Layout: ``<root>/<class>/train/good/*``, ``<root>/<class>/test/<good|defect>/*`` and
``<root>/<class>/ground_truth/<defect>/<stem>_mask.png``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcad.data.datasets.base import DatasetFormat, Download
from mcad.data.io import DataError, is_image_file
from mcad.data.records import SampleRecord

log = logging.getLogger(__name__)

MVTEC_CLASSES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MVTEC_DOWNLOAD = Download(
    url="https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/420938113-1629952094/mvtec_anomaly_detection.tar.xz",
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",  # as published by anomalib
)
MVTEC_MANUAL = (
    "Download mvtec_anomaly_detection.tar.xz from https://www.mvtec.com/company/research/datasets/mvtec-ad "
    "and extract it so that <root>/bottle/train/good exists."
)


def _images_in(folder: Path) -> list[Path]:
    """Image files of a folder, sorted; other files are skipped with a warning (documented)."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if is_image_file(p)]
    for other in sorted(set(files) - set(images)):
        log.warning("Ignoring non-image file %s", other)
    return images


def discover_classes(root: str | Path) -> list[str]:
    """Class folders of an MVTec-layout root: sub-folders that contain ``train/good``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. Set data.root to the folder that holds the class folders.")
    classes = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    # A folder that looks like a class (it has a split or ground truth) but lacks train/good is a broken
    # class, not an unrelated folder: training silently without it would bias the benchmark.
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in classes):
        if any((folder / part).exists() for part in ("train", "test", "ground_truth")):
            raise DataError(
                f"Class folder {folder} has no train/good folder (MVTec layout expected). Add it, remove the "
                "folder, or choose the classes with data.classes=[...]."
            )
    if not classes:
        raise DataError(f"No class folders with train/good found under {root}.")
    return classes


def _mask_for(root: Path, class_name: str, defect: str, image: Path) -> Path:
    folder = root / class_name / "ground_truth" / defect
    for candidate in (folder / f"{image.stem}_mask.png", folder / f"{image.stem}.png"):
        if candidate.is_file():
            return candidate
    raise DataError(f"No mask for anomalous test image {image}: expected {folder / (image.stem + '_mask.png')}.")


def mvtec_layout_records(root: str | Path, classes: Sequence[str], split: str) -> list[SampleRecord]:
    """Lists the samples of ``split`` (``train`` or ``test``) for the given classes.

    Raises:
        DataError: A class folder, its ``train/good`` folder or a mask is missing, or a class has no
            images in the split.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. Set data.root to the folder that holds the class folders.")
    records: list[SampleRecord] = []
    for name in classes:
        class_dir = root / name
        if not class_dir.is_dir():
            raise DataError(f"Class folder not found: {class_dir}")
        if not (class_dir / "train" / "good").is_dir():
            raise DataError(f"Class folder {class_dir} has no train/good folder (MVTec layout expected).")
        split_dir = class_dir / split
        if not split_dir.is_dir():
            raise DataError(f"Class folder {class_dir} has no {split}/ folder.")
        defects = ["good"] if split == "train" else sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        count = 0
        for defect in defects:
            for image in _images_in(split_dir / defect):
                if defect == "good":
                    records.append(SampleRecord(str(image), None, 0, name, "good"))
                else:
                    mask = _mask_for(root, name, defect, image)
                    records.append(SampleRecord(str(image), str(mask), 1, name, defect))
                count += 1
        if count == 0:
            raise DataError(f"Class '{name}' has no images in {split_dir}.")
    return records


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return mvtec_layout_records(root, classes, split)


MVTEC = DatasetFormat(
    name="mvtec",
    list_records=_list,
    classes=MVTEC_CLASSES,
    marker="{class}/train/good",
    download=MVTEC_DOWNLOAD,
    manual=MVTEC_MANUAL,
    licence="CC BY-NC-SA 4.0",
)

FOLDER = DatasetFormat(
    name="folder",
    list_records=_list,
    discover=discover_classes,
    manual="Point data.root at a folder of <class>/train/good, <class>/test/<type>, <class>/ground_truth/<type>.",
    licence="the folder's own",
)
