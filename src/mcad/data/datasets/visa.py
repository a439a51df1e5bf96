"""VisA with its official 1-class split (``split_csv/1cls.csv`` from the VisA archive)."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mcad.data.datasets.base import DatasetFormat, Download
from mcad.data.io import DataError
from mcad.data.records import SampleRecord

VISA_CLASSES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
# The publisher gives no checksum; pass data.sha256=<hex> to enforce one.
VISA_DOWNLOAD = Download(url="https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar")
VISA_MANUAL = (
    "Download VisA_20220922.tar from https://github.com/amazon-science/spot-diff and extract it so that "
    "<root>/split_csv/1cls.csv and <root>/candle/Data/Images exist."
)


def visa_records(
    root: str | Path, classes: Sequence[str], split: str, split_csv: str = "split_csv/1cls.csv"
) -> list[SampleRecord]:
    """Lists the samples of ``split`` from the official split CSV.

    The CSV has the columns ``object, split, label, image, mask`` with paths relative to ``root``;
    ``label`` is ``normal`` or ``anomaly``.
    """
    root = Path(root)
    csv_path = root / split_csv
    if not csv_path.is_file():
        raise DataError(f"VisA split file not found: {csv_path}. {VISA_MANUAL}")
    wanted = set(classes)
    records: list[SampleRecord] = []
    with csv_path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            if row["object"] not in wanted or row["split"] != split:
                continue
            anomalous = row["label"].strip().lower() == "anomaly"
            mask = str(root / row["mask"]) if anomalous and row.get("mask") else None
            if anomalous and mask is None:
                raise DataError(f"Anomalous VisA image {row['image']} has no mask entry in {csv_path}.")
            records.append(
                SampleRecord(
                    str(root / row["image"]), mask, int(anomalous), row["object"], "bad" if anomalous else "good"
                )
            )
    found = {r.class_name for r in records}
    missing = [c for c in classes if c not in found]
    if missing:
        raise DataError(f"VisA classes {missing} have no '{split}' rows in {csv_path}.")
    return records


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return visa_records(root, classes, split, options["split_csv"])


VISA = DatasetFormat(
    name="visa",
    list_records=_list,
    classes=VISA_CLASSES,
    marker="{split_csv}",
    download=VISA_DOWNLOAD,
    manual=VISA_MANUAL,
    licence="CC BY 4.0",
    options={"split_csv": "split_csv/1cls.csv"},
)
