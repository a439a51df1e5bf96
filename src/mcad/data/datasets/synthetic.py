"""A procedural multi-class dataset with drawn defects and exact masks.

Generated deterministically from a seed and written once in the MVTec layout under a cache folder
whose name hashes every generation parameter, so a run never regenerates it and two settings never
share a folder. It needs no download, which makes it the embedded default and the test dataset.

Classes: two textures (``stripes``, ``checker``) and two objects (``disk``, ``nut``); defects are
scratches, blobs and spots drawn with OpenCV, whose pixels are exactly the mask.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mcad.data.datasets.base import DatasetFormat
from mcad.data.datasets.mvtec import mvtec_layout_records
from mcad.data.records import SampleRecord
from mcad.utils.files import default_mode

SYNTHETIC_CLASSES = ("stripes", "checker", "disk", "nut")
_GENERATOR_VERSION = 2  # bump when the drawing code changes, so caches are rebuilt


def _noise(rng: np.random.Generator, size: int, amount: float) -> np.ndarray:
    return rng.normal(0.0, amount, (size, size, 1))


def _normal_image(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draws one defect-free image of a class as float RGB in [0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if class_name == "stripes":
        phase = rng.uniform(0, 2 * np.pi)
        freq = 8.0 + rng.uniform(-0.3, 0.3)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx + 0.15 * yy) + phase)
        base = np.array([60.0, 110.0, 170.0]) + wave[..., None] * np.array([120.0, 100.0, 60.0])
        return base + _noise(rng, size, 6.0)
    if class_name == "checker":
        cells = 8
        ox, oy = rng.integers(0, size // cells, 2)
        board = ((((xx * size + ox) // (size / cells)) + ((yy * size + oy) // (size / cells))) % 2)[..., None]
        base = 90.0 + board * np.array([110.0, 100.0, 80.0])
        return base + _noise(rng, size, 5.0)
    background = np.array([40.0, 40.0, 45.0]) + _noise(rng, size, 4.0)
    img = np.broadcast_to(background, (size, size, 3)).copy()
    cx, cy = size / 2 + rng.uniform(-size / 32, size / 32, 2)
    if class_name == "disk":
        radius = size * 0.3
        cv2.circle(img, (int(cx), int(cy)), int(radius), (200.0, 170.0, 60.0), -1, lineType=cv2.LINE_AA)
        cv2.circle(img, (int(cx), int(cy)), int(radius * 0.4), (150.0, 120.0, 40.0), -1, lineType=cv2.LINE_AA)
    elif class_name == "nut":
        angle = rng.uniform(0, 60)
        # ellipse2Poly returns an (N, 2) int array; OpenCV's stubs type it as nested sequences.
        pts = np.asarray(
            cv2.ellipse2Poly((int(cx), int(cy)), (int(size * 0.32), int(size * 0.32)), int(angle), 0, 360, 60)
        )
        cv2.fillPoly(img, [pts], (170.0, 175.0, 185.0), lineType=cv2.LINE_AA)
        cv2.circle(img, (int(cx), int(cy)), int(size * 0.13), (40.0, 40.0, 45.0), -1, lineType=cv2.LINE_AA)
    else:
        raise ValueError(f"Unknown synthetic class '{class_name}' (known: {', '.join(SYNTHETIC_CLASSES)}).")
    return img + _noise(rng, size, 3.0)


def _defect(img: np.ndarray, class_name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draws one defect inside the object (or anywhere on a texture); returns image and mask."""
    size = img.shape[0]
    mask = np.zeros((size, size), np.uint8)
    center = np.array([size / 2, size / 2])
    spread = size * (0.35 if class_name in ("stripes", "checker") else 0.18)
    cx, cy = (center + rng.uniform(-spread, spread, 2)).astype(int)
    kind = rng.choice(["scratch", "blob", "spot"])
    if kind == "scratch":
        length, angle = rng.uniform(size * 0.12, size * 0.25), rng.uniform(0, np.pi)
        dx, dy = int(np.cos(angle) * length / 2), int(np.sin(angle) * length / 2)
        cv2.line(mask, (cx - dx, cy - dy), (cx + dx, cy + dy), 255, max(2, size // 64))
    elif kind == "blob":
        axes = (int(rng.uniform(size * 0.03, size * 0.08)), int(rng.uniform(size * 0.02, size * 0.06)))
        cv2.ellipse(mask, (cx, cy), axes, rng.uniform(0, 180), 0, 360, 255, -1)
    else:
        for _ in range(int(rng.integers(2, 5))):
            ox, oy = rng.integers(-size // 16, size // 16, 2)
            cv2.circle(mask, (int(cx + ox), int(cy + oy)), max(2, size // 48), 255, -1)
    colour = rng.uniform(0, 255, 3)
    region = mask.astype(bool)
    out = img.copy()
    out[region] = 0.25 * out[region] + 0.75 * colour + rng.normal(0, 10, (region.sum(), 3))
    return out, mask


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data: np.ndarray = np.clip(array + 0.5, 0, 255).astype(np.uint8)
    if data.ndim == 3:
        data = cv2.cvtColor(data, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), data):
        raise OSError(f"Could not write {path}")


def generate_synthetic_dataset(
    cache_dir: str | Path,
    classes: Sequence[str] = SYNTHETIC_CLASSES,
    num_train: int = 40,
    num_test_good: int = 10,
    num_test_defect: int = 10,
    image_size: int = 256,
    seed: int = 0,
) -> Path:
    """Generates (once) the dataset and returns its MVTec-layout root.

    The folder name is a hash of all arguments; generation happens in a temporary folder that is
    renamed into place, so an interrupted generation never leaves a half-written dataset.
    """
    params = {
        "classes": list(classes), "num_train": num_train, "num_test_good": num_test_good,
        "num_test_defect": num_test_defect, "image_size": image_size, "seed": seed, "version": _GENERATOR_VERSION,
    }  # fmt: skip
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() / f"synthetic-{key}"
    if (root / "params.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root.parent))
    tmp.chmod(default_mode(directory=True))  # mkdtemp's 0o700 would hide the dataset from other users
    try:
        for class_index, name in enumerate(classes):
            for split, count, defective in (
                ("train", num_train, False), ("test", num_test_good, False), ("test", num_test_defect, True),
            ):  # fmt: skip
                stream = {"train": 0, "test": 1}[split] * 2 + int(defective)
                for i in range(count):
                    rng = np.random.default_rng([seed, class_index, stream, i])
                    img = _normal_image(name, image_size, rng)
                    if defective:
                        img, mask = _defect(img, name, rng)
                        _write(tmp / name / split / "defect" / f"{i:03d}.png", img)
                        _write(tmp / name / "ground_truth" / "defect" / f"{i:03d}_mask.png", mask)
                    else:
                        _write(tmp / name / split / "good" / f"{i:03d}.png", img)
        (tmp / "params.json").write_text(json.dumps(params, indent=1))
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first
            if not (root / "params.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _generate(cache_dir: Path, classes: Sequence[str], options: Mapping[str, Any]) -> Path:
    return generate_synthetic_dataset(cache_dir, classes=tuple(classes or SYNTHETIC_CLASSES), **options)


def _list(root: Path, classes: Sequence[str], split: str, options: Mapping[str, Any]) -> list[SampleRecord]:
    return mvtec_layout_records(root, classes, split)


SYNTHETIC = DatasetFormat(
    name="synthetic",
    list_records=_list,
    classes=SYNTHETIC_CLASSES,
    generate=_generate,
    manual="Generated under data.cache_dir; nothing to download.",
    licence="generated by mcad (Apache-2.0)",
    options={"num_train": 40, "num_test_good": 10, "num_test_defect": 10, "image_size": 256, "seed": 0},
)
