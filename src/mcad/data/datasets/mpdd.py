"""MPDD (Metal Parts Defect Detection, Jezek et al., ICUMT 2021): 6 metal-part classes in the MVTec layout.

Layout (``stepanje/MPDD``; anomalib and ADer read it the same way)::

    <root>/<class>/train/good/000.png
    <root>/<class>/test/good/000.png
    <root>/<class>/test/<defect>/000.png            e.g. bracket_black/test/hole, metal_plate/test/total_rust
    <root>/<class>/ground_truth/<defect>/000_mask.png

so it is listed by :func:`~mcad.data.datasets.mvtec.mvtec_layout_records` (masks matched by stem, ``_mask``
suffix). Official counts: 888 training and 458 test images (ADer's RD log).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcad.data.datasets.base import DatasetFormat
from mcad.data.datasets.mvtec import mvtec_layout_records
from mcad.data.records import SampleRecord

__all__ = ["MPDD", "MPDD_CLASSES"]

MPDD_CLASSES = ("bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes")
MPDD_MANUAL = (
    "MPDD has no direct download: get the MPDD folder from the OneDrive link in https://github.com/stepanje/MPDD "
    "(README) and place it so that <root>/bracket_black/train/good and <root>/<class>/ground_truth/<defect>/"
    "<stem>_mask.png exist for the 6 classes (MVTec layout)."
)


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return mvtec_layout_records(root, classes, split)


MPDD = DatasetFormat(
    name="mpdd",
    list_records=_list,
    classes=MPDD_CLASSES,
    marker="{class}/train/good",
    download=None,  # OneDrive only, no checksum published
    manual=MPDD_MANUAL,
    # As given by anomalib (datasets/image/mpdd.py); the official README states no licence.
    licence="CC BY-NC-SA 4.0 (per anomalib; the official README states none)",
)
