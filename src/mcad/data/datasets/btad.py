"""BTAD (BeanTech Anomaly Detection, "BTech"): 3 industrial products, classes ``01``, ``02``, ``03``.

Layout of the official archive ``btad.zip`` (its top folder ``BTech_Dataset_transformed/``)::

    <root>/<class>/train/ok/0000.<ext>          normal training images
    <root>/<class>/test/ok/0000.<ext>           normal test images
    <root>/<class>/test/ko/0000.<ext>           anomalous test images
    <root>/<class>/ground_truth/ko/0000.<mext>  their masks, same stem

Extensions differ per class in the original archive: images ``01`` .bmp, ``02`` .png, ``03`` .bmp; masks
``01`` and ``02`` .png, ``03`` .bmp (anomalib converts everything to .png after download, other loaders
hard-code the per-class extension). Masks are therefore matched to images **by stem, whatever the
extension** of either (``.png`` preferred when a stem has several). ``<root>`` may be the folder holding
the class folders or the one holding ``BTech_Dataset_transformed/`` (where ``data.download=true`` extracts
the archive). Some class ``03`` masks are all zero (``test/ko/0028``-``0037``, noted by third parties):
those images stay anomalous and add no pixel positives. The class names are strings (Hydra keeps
``data.classes=[01,03]`` as strings); integers given from Python (``classes=[1, 3]``) are zero-padded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcad.data.datasets.base import DatasetFormat, Download
from mcad.data.datasets.mvtec import _images_in
from mcad.data.download import download_and_extract
from mcad.data.io import DataError, is_image_file
from mcad.data.records import SampleRecord

__all__ = ["BTAD", "BTAD_CLASSES", "BTAD_DOWNLOAD", "BTADFormat", "btad_records"]

BTAD_CLASSES = ("01", "02", "03")
# The folder the archive unpacks to; CCL's configs spell it with a capital T.
ARCHIVE_FOLDERS = ("BTech_Dataset_transformed", "BTech_Dataset_Transformed")
BTAD_DOWNLOAD = Download(
    url="https://avires.dimi.uniud.it/papers/btad/btad.zip",
    sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",  # as published by anomalib
)
BTAD_MANUAL = (
    "Download btad.zip from https://avires.dimi.uniud.it/papers/btad/btad.zip (SHA-256 461c9387...d2a) and extract "
    "it into <root>, so that <root>/BTech_Dataset_transformed/01/train/ok (or <root>/01/train/ok) exists: "
    "per class train/ok, test/ok, test/ko and ground_truth/ko with masks named like their images."
)
_NORMAL = "ok"
# Which mask file wins when one stem has several (a converted copy beside the original).
_MASK_PREFERENCE = (".png", ".bmp")


def _masks_by_stem(folder: Path) -> dict[str, Path]:
    """Mask files of a ground-truth folder keyed by stem (``0003.bmp`` -> ``0003``)."""
    masks: dict[str, Path] = {}
    if not folder.is_dir():
        return masks
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    rank = {ext: i for i, ext in enumerate(_MASK_PREFERENCE)}
    for path in sorted(files, key=lambda p: (rank.get(p.suffix.lower(), len(rank)), p.name)):
        masks.setdefault(path.stem, path)
    return masks


def btad_records(root: str | Path, classes: Sequence[str], split: str) -> list[SampleRecord]:
    """Lists the samples of ``split`` (``train`` or ``test``) for the given BTAD classes.

    Returns:
        Training images of ``train/ok`` (normal); test images of ``test/ok`` (normal, ``defect_type``
        ``good``) and of every other ``test/<type>`` folder (anomalous, ``defect_type`` = the folder,
        ``ko``) with the mask of the same stem in ``ground_truth/<type>/``.

    Raises:
        DataError: A class folder, ``train/ok``, the split folder or a mask is missing, or a class has no
            images in the split (the path is named).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. {BTAD_MANUAL}")
    if split not in ("train", "test"):
        raise DataError(f"BTAD splits are 'train' and 'test', got {split!r}.")
    records: list[SampleRecord] = []
    for name in classes:
        class_dir = root / name
        if not class_dir.is_dir():
            raise DataError(f"Class folder not found: {class_dir}. {BTAD_MANUAL}")
        if not (class_dir / "train" / _NORMAL).is_dir():
            raise DataError(f"Class folder {class_dir} has no train/ok folder (BTAD layout expected). {BTAD_MANUAL}")
        split_dir = class_dir / split
        if not split_dir.is_dir():
            raise DataError(f"Class folder {class_dir} has no {split}/ folder (BTAD layout expected).")
        kinds = [_NORMAL] if split == "train" else sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        count = 0
        for kind in kinds:
            images = _images_in(split_dir / kind)
            if kind == _NORMAL:
                records.extend(SampleRecord(str(p), None, 0, name, "good") for p in images)
            else:
                gt_dir = class_dir / "ground_truth" / kind
                masks = _masks_by_stem(gt_dir)
                for image in images:
                    mask = masks.get(image.stem)
                    if mask is None:
                        raise DataError(
                            f"No mask for anomalous test image {image}: expected {gt_dir}/{image.stem}.<png|bmp>."
                        )
                    records.append(SampleRecord(str(image), str(mask), 1, name, kind))
            count += len(images)
        if count == 0:
            raise DataError(f"Class '{name}' has no images in {split_dir}.")
    return records


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return btad_records(root, classes, split)


def _class_name(value: Any) -> str:
    # Python callers may write classes=[1, 3]; the folders are 01, 03.
    return f"{value:02d}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


@dataclasses.dataclass(frozen=True)
class BTADFormat(DatasetFormat):
    """BTAD's record: also finds the data inside the archive's own top folder, and zero-pads class names."""

    def locate(
        self, root: str | Path | None, options: Mapping[str, Any], cache_dir: Path, classes: Sequence[str] | None,
        download: bool = False, sha256: str | None = None,
    ) -> Path:  # fmt: skip
        """The folder holding the class folders: ``root`` or ``root/BTech_Dataset_transformed``.

        Raises:
            DataError: Neither holds the data (both paths named) and no download was allowed, or the
                extracted archive does not hold it.
        """
        if not root:
            raise DataError(f"data.root is required for data.format={self.name} (e.g. data.root=/data/btad).")
        folder = Path(root).expanduser()
        first = ([_class_name(c) for c in classes or ()] or list(BTAD_CLASSES))[0]
        assert self.marker is not None
        marker = self.marker.format(**options, **{"class": first})
        candidates = [folder, *(folder / sub for sub in ARCHIVE_FOLDERS)]
        for candidate in candidates:
            if (candidate / marker).exists():
                return candidate
        searched = ", ".join(str(c / marker) for c in candidates)
        if not download or self.download is None:
            raise DataError(f"btad data not found under {folder} (searched {searched}). {self.manual} "
                            "Or set data.download=true.")  # fmt: skip
        download_and_extract(self.download.url, folder, sha256 or self.download.sha256, self.manual)
        for candidate in candidates:
            if (candidate / marker).exists():
                return candidate
        raise DataError(f"The btad archive was extracted into {folder} but none of {searched} exists. {self.manual}")

    def class_names(self, root: Path, requested: Sequence[str] | None) -> list[str]:
        """As :meth:`DatasetFormat.class_names`, with integer class names zero-padded (``1`` -> ``01``)."""
        return super().class_names(root, [_class_name(c) for c in requested] if requested else requested)


BTAD = BTADFormat(
    name="btad",
    list_records=_list,
    classes=BTAD_CLASSES,
    marker="{class}/train/ok",
    download=BTAD_DOWNLOAD,
    manual=BTAD_MANUAL,
    licence="CC BY-NC-SA 4.0",
)
