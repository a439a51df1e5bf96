"""Real-IAD (Tencent Youtu, CVPR 2024): 30 objects, 5 camera views each, the official JSON splits.

Layout (official, ``Tencent/AnomalyDetection_Real-IAD`` README; the resolution and JSON folders are chosen
with ``data.options.resolution`` and ``data.options.jsons``)::

    <root>/realiad_1024/<object>/OK/S0001/<object>_0001_OK_C1_<timestamp>.jpg           normal view
    <root>/realiad_1024/<object>/NG/<CODE>/S0044/<object>_0044_NG_<CODE>_C1_<ts>.jpg     view of a defective object
    <root>/realiad_1024/<object>/NG/<CODE>/S0044/<object>_0044_NG_<CODE>_C1_<ts>.png     its mask (when visible)
    <root>/realiad_256 | realiad_512 | realiad_raw/...                                    the same at other sizes
    <root>/realiad_jsons/<object>.json          multi-view split, all 5 views C1..C5 (default)
    <root>/realiad_jsons_sv/<object>.json       single-view split (C1 only)
    <root>/realiad_jsons_fuiad_0.{0,1,2,4}/...  fully-unsupervised splits (noisy training sets)

The JSON folders are also found nested one level deeper, ``<root>/realiad_jsons/<set>/<object>.json``, which is
what extracting ``realiad_jsons.zip`` into its own folder gives and what Dinomaly, CRR and anomalib read.
Each JSON is ``{"meta": {"prefix": "<object>/", "normal_class": "OK"}, "train": [...], "test": [...]}``
whose entries hold exactly ``category``, ``anomaly_class``, ``image_path`` and ``mask_path``, paths relative
to ``realiad_<res>/`` after the prefix (official ``datasets/explicit_dataset.py``). The mask path is taken
from the JSON, never derived from the image name (file naming has quirks, e.g. ``audiojack__0003_...``).

Labels: a test entry is anomalous when its ``anomaly_class`` is not the meta ``normal_class`` (``OK``), and
must then have a mask; normal entries get no mask (all zero), even under ``NG/`` folders: a view of a
defective object in which the defect is not visible is labelled ``OK`` with ``mask_path: null``. Every
training entry is normal, as in the official loader (the FUIAD sets put unlabelled defective images into
training on purpose). ``defect_type`` is the entry's ``anomaly_class`` code (``OK``, ``AK`` pit, ``BX``
deformation, ``CH`` abrasion, ``HS`` scratch, ``PS`` damage, ``QS`` missing parts, ``YW`` foreign object,
``ZW`` contamination); the class name is the category.

Image level versus sample level. Real-IAD photographs every object from 5 cameras, so a test *sample*
(one object, e.g. ``audiojack_0044_NG``) is 5 images ``C1..C5``. The official toolkit (ADEval,
``--sample_key_pat``) also reports sample-level metrics (S-AUROC): the 5 views are grouped by that key and
the sample is anomalous if any view is, scored from its views. The multi-class methods mcad reproduces
(RD in the ADer benchmark, CCL, Dinomaly, CRR) report **image-level** metrics: every view is an
independent test image (114,585 test images with ``realiad_jsons``), I-AUROC / I-AP / I-F1max over views
and pixel metrics over their masks. mcad evaluates image level per view in the same way; sample-level
numbers are not computed (a view's label already says whether its defect is visible in it). The view is
the second-to-last ``_`` field of the file name, which ``data.options.views=[C1, ...]`` filters on, as
ADer's ``cfg.data.views``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from mcad.data.datasets.base import DatasetFormat
from mcad.data.io import DataError
from mcad.data.records import SampleRecord

__all__ = [
    "JSON_SETS",
    "REALIAD",
    "REALIAD_CLASSES",
    "RESOLUTIONS",
    "VIEWS",
    "find_split_file",
    "realiad_records",
    "resolution_folder",
    "split_file_candidates",
    "view_of",
]

log = logging.getLogger(__name__)

# CRR's item_list (dinomaly_realiad_uni_first.py:238-242), the order of Dinomaly's Real-IAD scripts and of
# the per-class tables: sorted, except that u_block follows usb_adaptor.
REALIAD_CLASSES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood",
    "mint", "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug",
    "porcelain_doll", "regulator", "rolled_strip_base", "sim_card_set", "switch", "tape",
    "terminalblock", "toothbrush", "toy", "toy_brick", "transistor1", "usb",
    "usb_adaptor", "u_block", "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip
RESOLUTIONS = ("256", "512", "1024", "raw")
JSON_SETS = (
    "realiad_jsons", "realiad_jsons_sv", "realiad_jsons_fuiad_0.0", "realiad_jsons_fuiad_0.1",
    "realiad_jsons_fuiad_0.2", "realiad_jsons_fuiad_0.4",
)  # fmt: skip
VIEWS = ("C1", "C2", "C3", "C4", "C5")
_SAMPLE_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
REALIAD_MANUAL = (
    "Real-IAD is distributed on request only (no public URL, no checksum): apply at "
    "https://realiad4ad.github.io/Real-IAD/ (or the gated Hugging Face dataset Real-IAD/Real-IAD), extract the "
    "per-object ZIPs of one resolution into <root>/realiad_1024/<object>/ (or realiad_256, realiad_512, "
    "realiad_raw: data.options.resolution=256|512|1024|raw) and realiad_jsons.zip so that "
    "<root>/realiad_jsons/<object>.json or <root>/realiad_jsons/realiad_jsons/<object>.json exists "
    "(data.options.jsons=realiad_jsons_sv for the single-view split)."
)


def resolution_folder(resolution: int | str) -> str:
    """The image folder of a resolution: ``1024`` -> ``realiad_1024``.

    Raises:
        DataError: ``resolution`` is not one of :data:`RESOLUTIONS`.
    """
    value = str(resolution).strip().lower()
    if value not in RESOLUTIONS:
        raise DataError(
            f"data.options.resolution must be one of {', '.join(RESOLUTIONS)} (Real-IAD's realiad_<res> folders), "
            f"got {resolution!r}."
        )
    return f"realiad_{value}"


def view_of(image_path: str) -> str:
    """The camera view of a Real-IAD file name (``..._NG_BX_C2_20231023111640.jpg`` -> ``C2``)."""
    parts = PurePosixPath(image_path).stem.split("_")
    return parts[-2] if len(parts) >= 2 else ""


def split_file_candidates(root: Path, jsons: str, class_name: str) -> list[Path]:
    """Where the split file of a class may lie, in the order searched: flat (official), then nested."""
    return [root / jsons / f"{class_name}.json", root / "realiad_jsons" / jsons / f"{class_name}.json"]


def find_split_file(root: str | Path, jsons: str, class_name: str) -> Path:
    """The JSON of ``class_name`` in the split set ``jsons``, at the root or nested under ``realiad_jsons/``.

    Raises:
        DataError: ``jsons`` is not a Real-IAD split set, or no candidate exists (every searched path named).
    """
    if jsons not in JSON_SETS:
        raise DataError(f"data.options.jsons must be one of {', '.join(JSON_SETS)}, got {jsons!r}.")
    candidates = split_file_candidates(Path(root), jsons, class_name)
    for path in candidates:
        if path.is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise DataError(f"Real-IAD split file of class '{class_name}' not found; searched {searched}. {REALIAD_MANUAL}")


def _load_split_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads and checks one split JSON; returns ``(meta, whole file)``."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"Cannot read the Real-IAD split file {path}: {err}") from err
    if not isinstance(info, dict) or not all(key in info for key in ("meta", "train", "test")):
        raise DataError(f"Real-IAD split file {path} must be an object with 'meta', 'train' and 'test' keys.")
    meta = info["meta"]
    if not isinstance(meta, dict) or "prefix" not in meta or "normal_class" not in meta:
        raise DataError(f"Real-IAD split file {path}: 'meta' must hold 'prefix' and 'normal_class'.")
    return meta, info


def realiad_records(
    root: str | Path,
    classes: Sequence[str],
    split: str,
    resolution: int | str = 1024,
    jsons: str = "realiad_jsons",
    views: Sequence[str] | None = None,
) -> list[SampleRecord]:
    """Lists the samples of ``split`` (``train`` or ``test``) from the official JSON split files.

    Args:
        root: The Real-IAD folder holding ``realiad_<res>/`` and the JSON folders.
        classes: Objects to list.
        split: ``train`` or ``test``.
        resolution: Image folder, ``256``, ``512``, ``1024`` or ``raw``.
        jsons: Split set (:data:`JSON_SETS`).
        views: Keep only these camera views (``["C1"]``); ``None`` = every view in the JSON.

    Returns:
        One record per listed view; training records are normal, test records anomalous exactly when their
        ``anomaly_class`` differs from the meta ``normal_class``.

    Raises:
        DataError: A folder, split file or key is missing or malformed (the path is named), an anomalous
            entry has no mask, an option is invalid, or a class has no entry in the split.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise DataError(f"Real-IAD splits are 'train' and 'test', got {split!r}.")
    if not root.is_dir():
        raise DataError(f"Dataset root not found: {root}. {REALIAD_MANUAL}")
    image_root = root / resolution_folder(resolution)
    wanted_views = None
    if views:
        wanted_views = {str(v).upper() for v in views}
        unknown = sorted(wanted_views - set(VIEWS))
        if unknown:
            raise DataError(f"data.options.views {unknown} are not Real-IAD views (known: {', '.join(VIEWS)}).")
    records: list[SampleRecord] = []
    for name in classes:
        if not (image_root / name).is_dir():
            raise DataError(f"Real-IAD image folder not found: {image_root / name}. {REALIAD_MANUAL}")
        path = find_split_file(root, jsons, name)
        meta, info = _load_split_file(path)
        entries = info[split]
        if not isinstance(entries, list):
            raise DataError(f"Real-IAD split file {path}: '{split}' must be a list of samples.")
        prefix, normal_class = str(meta["prefix"]), str(meta["normal_class"])
        count = 0
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or any(key not in entry for key in _SAMPLE_KEYS):
                raise DataError(
                    f"Real-IAD split file {path}: {split}[{i}] must hold the keys {', '.join(_SAMPLE_KEYS)}."
                )
            image_rel = str(entry["image_path"])
            if wanted_views is not None and view_of(image_rel) not in wanted_views:
                continue
            code = str(entry["anomaly_class"])
            anomalous = split == "test" and code != normal_class
            mask = None
            if anomalous:
                if not entry["mask_path"]:
                    raise DataError(
                        f"Real-IAD split file {path}: anomalous test entry {image_rel} ({code}) has no mask_path."
                    )
                mask = str(image_root / (prefix + str(entry["mask_path"])))
            records.append(SampleRecord(str(image_root / (prefix + image_rel)), mask, int(anomalous), name, code))
            count += 1
        if count == 0:
            which = f" for views {sorted(wanted_views)}" if wanted_views else ""
            raise DataError(f"Class '{name}' has no '{split}' entries{which} in {path}.")
        log.debug("Real-IAD %s/%s: %d %s entries from %s", name, resolution, count, split, path)
    return records


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    views = list(options["views"]) if options.get("views") else None
    return realiad_records(root, classes, split, options["resolution"], options["jsons"], views)


REALIAD = DatasetFormat(
    name="realiad",
    list_records=_list,
    classes=REALIAD_CLASSES,
    # The image folder of the first class; the split files are looked for (at two places) when listing.
    marker="realiad_{resolution}/{class}",
    download=None,
    manual=REALIAD_MANUAL,
    licence="CC BY-NC-SA 4.0",
    options={"resolution": 1024, "jsons": "realiad_jsons", "views": None},
)
