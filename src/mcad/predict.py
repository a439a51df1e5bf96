"""``mcad-predict ckpt_path=... input=DIR_OR_IMAGE output=DIR``: anomaly maps and decisions for unlabelled images.

The images go through the run's own test pipeline (resize to ``data.image_size``, optional centre crop,
the backbone's normalisation) and the run's protocol (upsampling to ``eval_size``, fusion, smoothing,
image score), exactly as in evaluation. Outputs, mirroring the input folder's tree:

* ``maps/<image>.npy``: the evaluated map, float32 ``(eval_size, eval_size)``;
* ``maps/<image>.png``: the image with the map as a heat map and the region above the pixel threshold
  outlined in red;
* ``masks/<image>.png``: that region (255 = anomalous), when a threshold exists;
* ``scores.csv``: ``path, score, anomalous, image_threshold``;
* ``threshold.json``: the thresholds and how they were chosen.

Thresholds are chosen on **normal data only** (the input has no labels), one for all classes since an
unlabelled image has no class:

* ``calibration=train`` (default): the run's training images, which are normal by construction, up to
  ``calibration_max_images`` spread evenly over the classes; ``calibration=<folder>``: any folder of normal
  images; ``calibration=none``: no calibration;
* image threshold = the ``quantile`` (default 1.0, the maximum) of their image scores: with 1.0 none of the
  calibration images would be flagged. An image is *anomalous* when its score is strictly above it;
* pixel threshold = the same quantile of their per-image map maxima, so that the calibration images'
  masks stay empty;
* ``threshold=<value>`` fixes both thresholds instead.

Training images score lower than unseen normal images (the model was fitted to them), so the default
errs towards flagging; a folder of held-out normal images gives a better-calibrated threshold.

Colour scale of the PNGs, the same for every image: blue = the lowest calibration map value, the middle of
the scale = the pixel threshold, red = as far above the threshold as the lowest value is below it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mcad.data.dataset import AnomalyDataset, Normalizer, build_transform
from mcad.data.io import is_image_file
from mcad.data.records import SampleRecord
from mcad.evaluate import find_run_dir, load_method, load_run_config
from mcad.evaluation.results import atomic_write_text
from mcad.logging.render import blend, denormalize, draw_region, heat_map, write_png
from mcad.train import config_dir

log = logging.getLogger(__name__)

UNLABELLED = "unlabelled"


def list_images(path: str | Path) -> tuple[Path, list[Path]]:
    """The images under ``path`` (a file or a folder, recursively, sorted) and the folder they are relative to.

    Raises:
        FileNotFoundError: ``path`` does not exist or holds no image.
    """
    path = Path(path).expanduser()
    if path.is_file():
        return path.parent, [path]
    if not path.is_dir():
        raise FileNotFoundError(f"Input not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
    if not files:
        raise FileNotFoundError(f"No image files under {path}.")
    return path, files


def _dataset(files: list[Path], datamodule: Any) -> AnomalyDataset:
    """The run's test pipeline over unlabelled files."""
    records = [SampleRecord(str(f), None, 0, UNLABELLED, "unknown") for f in files]
    return AnomalyDataset(
        records,
        [UNLABELLED],
        datamodule.image_size,
        build_transform(datamodule.crop_size),
        Normalizer(datamodule.mean, datamodule.std),
        cache=None,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def score_images(method: Any, dataset: AnomalyDataset, batch_size: int, num_workers: int, device: torch.device):
    """Yields ``(batch, maps (B, S, S) numpy, scores (B,) numpy)`` through the method's predict path."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for i, batch in enumerate(loader):
        batch = dict(batch)
        batch["image"] = batch["image"].to(device)
        out = method.predict_step(batch, i)
        yield batch, out["anomaly_map"].float().numpy(), out["score"].double().numpy()


def _calibration_files(cfg: DictConfig, datamodule: Any) -> tuple[list[Path], str]:
    """Normal images for the thresholds and a description of where they come from."""
    source = str(cfg.calibration)
    limit = int(cfg.calibration_max_images)
    if source == "train":
        try:
            records = datamodule.records("train")
        except Exception as err:  # noqa: BLE001 - any data error: explain how to proceed
            raise RuntimeError(
                f"calibration=train needs the run's training data ({type(err).__name__}: {err}). Point to it with "
                "+set.data.root=..., or pass calibration=<folder of normal images>, or a fixed threshold=<value>."
            ) from err
        by_class: dict[str, list[str]] = defaultdict(list)
        for rec in records:
            by_class[rec.class_name].append(rec.image_path)
        per_class = max(1, math.ceil(limit / max(1, len(by_class))))
        files = [Path(p) for paths in by_class.values() for p in paths[:per_class]][:limit]
        return files, f"training images of '{datamodule.name}' ({len(files)}: up to {per_class} per class)"
    _, files = list_images(source)
    if len(files) > limit:
        files = [files[int(i)] for i in np.linspace(0, len(files) - 1, limit).round()]
    return files, f"normal images in {source} ({len(files)})"


def calibrate(cfg: DictConfig, method: Any, datamodule: Any, device: torch.device) -> dict[str, Any]:
    """Image and pixel thresholds (see the module docstring)."""
    if cfg.get("threshold") is not None:
        t = float(cfg.threshold)
        return {"image_threshold": t, "pixel_threshold": t, "map_low": None, "source": "fixed (threshold=...)"}
    if str(cfg.calibration).lower() in ("none", "null", ""):
        return {"image_threshold": None, "pixel_threshold": None, "map_low": None, "source": "none"}
    files, source = _calibration_files(cfg, datamodule)
    scores, maxima, minima = [], [], []
    for _, maps, s in score_images(method, _dataset(files, datamodule), int(cfg.batch_size), int(cfg.num_workers),
                                   device):  # fmt: skip
        scores += s.tolist()
        maxima += maps.reshape(len(maps), -1).max(axis=1).tolist()
        minima += maps.reshape(len(maps), -1).min(axis=1).tolist()
    q = float(cfg.quantile)
    return {
        "image_threshold": float(np.quantile(scores, q)),
        "pixel_threshold": float(np.quantile(maxima, q)),
        "map_low": float(min(minima)),
        "source": source,
        "quantile": q,
        "calibration_images": len(files),
        "calibration_score_range": [float(min(scores)), float(max(scores))],
    }


def _relative_stem(file: Path, root: Path) -> Path:
    try:
        rel = file.relative_to(root)
    except ValueError:
        rel = Path(file.name)
    return rel.with_suffix("")


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Runs the prediction (see the module docstring); returns the thresholds and the per-image rows."""
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    run_dir = Path(cfg.run_dir).expanduser() if cfg.get("run_dir") else find_run_dir(ckpt)
    output = Path(cfg.output).expanduser()
    run_cfg = load_run_config(run_dir, output, cfg.get("set"))
    device = _device(str(cfg.device))
    method, datamodule = load_method(run_cfg, ckpt)
    method.to(device)
    root, files = list_images(cfg.input)
    thresholds = calibrate(cfg, method, datamodule, device)
    t_image, t_pixel = thresholds["image_threshold"], thresholds["pixel_threshold"]
    low = thresholds.get("map_low")
    mean, std = datamodule.mean, datamodule.std
    rows: list[dict[str, Any]] = []
    dataset = _dataset(files, datamodule)
    for batch, maps, scores in score_images(method, dataset, int(cfg.batch_size), int(cfg.num_workers), device):
        for i, amap in enumerate(maps):
            file = Path(batch["path"][i])
            stem = _relative_stem(file, root)
            score = float(scores[i])
            if cfg.save_npy:
                npy = output / "maps" / stem.with_suffix(".npy")
                npy.parent.mkdir(parents=True, exist_ok=True)
                np.save(npy, amap.astype(np.float32))
            if cfg.save_png:
                image = denormalize(batch["image"][i], mean, std, amap.shape[-1])
                lo = low if low is not None else float(amap.min())
                hi = 2 * t_pixel - lo if t_pixel is not None and t_pixel > lo else float(amap.max())
                overlay = blend(image, heat_map(amap, lo, hi))
                if t_pixel is not None:
                    region = amap > t_pixel
                    overlay = draw_region(overlay, region, (255, 0, 0))
                    write_png(output / "masks" / stem.with_suffix(".png"), np.repeat(region[..., None] * 255, 3, 2)
                              .astype(np.uint8))  # fmt: skip
                write_png(output / "maps" / stem.with_suffix(".png"), overlay)
            rows.append({
                "path": str(file),
                "score": score,
                "anomalous": "" if t_image is None else int(score > t_image),
                "image_threshold": "" if t_image is None else t_image,
            })  # fmt: skip
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["path", "score", "anomalous", "image_threshold"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output / "scores.csv", buf.getvalue())
    record = {
        **thresholds,
        "rule": "anomalous = score > image_threshold; mask = map > pixel_threshold",
        "checkpoint": str(ckpt),
        "protocol": method.protocol.to_dict(),
        "input": str(cfg.input),
        "images": len(rows),
    }
    atomic_write_text(output / "threshold.json", json.dumps(record, indent=2) + "\n")
    flagged = sum(1 for r in rows if r["anomalous"] == 1)
    log.info("Scored %d images into %s (%s anomalous; image threshold %s from %s).", len(rows), output,
             flagged if t_image is not None else "no decision", t_image, thresholds["source"])  # fmt: skip
    return {"thresholds": thresholds, "rows": rows, "output": str(output)}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="predict")
def main(cfg: DictConfig) -> None:
    """Console entry point ``mcad-predict``."""
    OmegaConf.resolve(cfg)
    predict(cfg)


if __name__ == "__main__":
    main()
