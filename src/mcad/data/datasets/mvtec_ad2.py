"""MVTec AD 2 (2025): 8 classes; the test split is chosen with ``data.options.test_split``.

Layout (anomalib ``datasets/image/mvtecad2.py``)::

    <root>/<class>/train/good/000_regular.png                       normal training images
    <root>/<class>/validation/good/*.png                            normal held-out images (no anomalies)
    <root>/<class>/test_public/good/000_regular.png                 normal test images
    <root>/<class>/test_public/bad/000_regular.png                  anomalous test images (lighting variants
    <root>/<class>/test_public/ground_truth/bad/000_regular_mask.png   _regular, _overexposed, _shift_1 ...)
    <root>/<class>/test_private/*.png                               no ground truth (evaluation server)
    <root>/<class>/test_private_mixed/*.png                         no ground truth, mixed lighting

``test_split``:

* ``test_public`` (default): the only split with ground truth; evaluated like any MVTec-layout test set.
* ``validation``: **refused as a test split**. It holds only normal images, so no image-level metric
  (AUROC, AP, F1max need both classes) and no pixel metric (no positive pixel) is defined; a run with it
  would report meaningless numbers. Its use is calibration on held-out normal data:
  ``mcad-predict ... calibration=<root>/<class>/validation/good`` chooses the decision threshold there
  instead of on training images (which score lower than unseen normal images).
* ``test_private`` / ``test_private_mixed``: predict-only (the masks are withheld for the benchmark server
  https://benchmark.mvtec.com/); evaluating them raises a :class:`DataError` that says to score them with
  ``mcad-predict input=<root>/<class>/test_private`` and submit the maps.

Training always uses ``train/good``; the validation images are never trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcad.data.datasets.base import DatasetFormat, Download
from mcad.data.datasets.mvtec import _images_in
from mcad.data.io import DataError
from mcad.data.records import SampleRecord

__all__ = ["MVTEC_AD2", "MVTEC_AD2_CLASSES", "TEST_SPLITS", "mvtec_ad2_records"]

MVTEC_AD2_CLASSES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
TEST_SPLITS = ("test_public", "validation", "test_private", "test_private_mixed")
MVTEC_AD2_DOWNLOAD = Download(
    url="https://www.mydrive.ch/shares/150997/701c90d3aea6588f404936e32a674602/download/466712769-1743429042/mvtec_ad_2.tar.gz",
    sha256="c0ded99ef32bfc8e352d52beb44515e5b292b8598cb963aadfa91ca0763505e4",  # as published by anomalib
)
MVTEC_AD2_MANUAL = (
    "Download mvtec_ad_2.tar.gz from https://www.mvtec.com/company/research/datasets/mvtec-ad-2 and extract it so "
    "that <root>/can/train/good and <root>/<class>/test_public/{good,bad,ground_truth/bad} exist for the 8 classes."
)


def _check_test_split(root: Path, classes: Sequence[str], test_split: str) -> None:
    """Raises for the splits mcad does not evaluate, saying what to do with them instead."""
    if test_split not in TEST_SPLITS:
        raise DataError(f"data.options.test_split must be one of {', '.join(TEST_SPLITS)}, got {test_split!r}.")
    example = root / (classes[0] if classes else "<class>") / test_split
    if test_split == "validation":
        raise DataError(
            "MVTec AD 2's validation split holds only normal images (validation/good): with no anomalous image and "
            "no defect pixel, image AUROC/AP/F1max and every pixel metric are undefined, so mcad does not evaluate "
            "it (data.options.test_split=test_public is the labelled test set). Use it as held-out normal data for "
            f"the decision threshold: mcad-predict ckpt_path=<run>/checkpoints/last.ckpt input=<images> "
            f"calibration={example}/good output=<dir>."
        )
    if test_split in ("test_private", "test_private_mixed"):
        raise DataError(
            f"MVTec AD 2's {test_split} split has no ground truth (withheld for https://benchmark.mvtec.com/), so it "
            f"cannot be evaluated: train with data.options.test_split=test_public, then score it with "
            f"mcad-predict ckpt_path=<run>/checkpoints/last.ckpt input={example} output=<dir> and submit the maps."
        )


def mvtec_ad2_records(
    root: str | Path, classes: Sequence[str], split: str, test_split: str = "test_public"
) -> list[SampleRecord]:
    """Lists the samples of ``split`` (``train`` or ``test``; ``test`` reads ``test_split``).

    Returns:
        ``train/good`` images (normal) for ``train``; for ``test`` the ``test_public/good`` images (normal) and
        those of every other ``test_public/<type>`` folder (``bad``: anomalous, mask
        ``ground_truth/<type>/<stem>_mask.png``).

    Raises:
        DataError: A folder or mask is missing (the path is named), a class has no images in the split, or
            ``test_split`` is one mcad does not evaluate (``validation``, ``test_private``,
            ``test_private_mixed``: the message says how to use it).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. {MVTEC_AD2_MANUAL}")
    if split not in ("train", "test"):
        raise DataError(f"MVTec AD 2 splits are 'train' and 'test', got {split!r}.")
    if split == "test":
        _check_test_split(root, classes, test_split)
    records: list[SampleRecord] = []
    for name in classes:
        class_dir = root / name
        if not class_dir.is_dir():
            raise DataError(f"Class folder not found: {class_dir}. {MVTEC_AD2_MANUAL}")
        if not (class_dir / "train" / "good").is_dir():
            raise DataError(f"Class folder {class_dir} has no train/good folder (MVTec AD 2 layout expected).")
        split_dir = class_dir / ("train" if split == "train" else test_split)
        if not split_dir.is_dir():
            raise DataError(f"Class folder {class_dir} has no {split_dir.name}/ folder (MVTec AD 2 layout expected).")
        kinds = ["good"]
        if split == "test":
            kinds = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name != "ground_truth")
        count = 0
        for kind in kinds:
            images = _images_in(split_dir / kind)
            if kind == "good":
                records.extend(SampleRecord(str(p), None, 0, name, "good") for p in images)
            else:
                for image in images:
                    mask = split_dir / "ground_truth" / kind / f"{image.stem}_mask.png"
                    if not mask.is_file():
                        raise DataError(f"No mask for anomalous test image {image}: expected {mask}.")
                    records.append(SampleRecord(str(image), str(mask), 1, name, kind))
            count += len(images)
        if count == 0:
            raise DataError(f"Class '{name}' has no images in {split_dir}.")
    return records


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return mvtec_ad2_records(root, classes, split, options["test_split"])


MVTEC_AD2 = DatasetFormat(
    name="mvtec_ad2",
    list_records=_list,
    classes=MVTEC_AD2_CLASSES,
    marker="{class}/train/good",
    download=MVTEC_AD2_DOWNLOAD,
    manual=MVTEC_AD2_MANUAL,
    licence="CC BY-NC-SA 4.0",
    options={"test_split": "test_public"},
)
