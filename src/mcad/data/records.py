"""The description of one sample, independent of dataset format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampleRecord:
    """One image of a split.

    Attributes:
        image_path: Path of the image file.
        mask_path: Path of the ground-truth mask, ``None`` for normal images (all-zero mask).
        label: 0 normal, 1 anomalous.
        class_name: The category (``bottle``).
        defect_type: ``good`` or the defect folder name.
    """

    image_path: str
    mask_path: str | None
    label: int
    class_name: str
    defect_type: str = "good"
