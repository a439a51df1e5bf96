"""``mcad-predict ckpt_path=... input=DIR_OR_IMAGE output=DIR``: anomaly maps and decisions for unlabelled images.

The images go through the run's own test pipeline (its input geometry, ``data.geometry``: resized to
``data.image_size`` square, aspect-kept and padded, or tiled; optional centre crop; the backbone's
normalisation) and the run's protocol (upsampling, fusion, stitching of tiles, smoothing, image score),
exactly as in evaluation (:mod:`mcad.evaluation.stitching`). Outputs, mirroring the input folder's tree,
at **each image's own resolution and aspect** unless named ``_eval``:

* ``maps/<image>.npy``: the evaluated map on the image's own pixel grid, float32 ``(H, W)`` of the file:
  the map the method produced, brought back with the inverse of the input transform
  (:func:`mcad.data.geometry.to_native`: a centre crop undone by placing the map in the crop window, the
  padding of ``keep_aspect`` dropped, the resize undone bilinearly); pixels a centre crop cut away (never
  seen by the model) hold the map's minimum;
* ``maps_eval/<image>.npy``: the same map on the evaluation grid, float32 ``protocol.eval_shape`` or
  ``(eval_size, eval_size)``: what the metrics of ``mcad-eval`` see;
* ``maps/<image>.png``: the image at its own resolution with the map as a heat map and the region above
  the pixel threshold outlined in red;
* ``masks/<image>.png``: that region (255 = anomalous) at the image's resolution, when a threshold exists;
* ``scores.csv``: ``path, score, anomalous, image_threshold, height, width`` (height and width of the file
  and of its ``maps/`` arrays);
* ``size.json``: which size each folder holds (``maps``, ``masks``: ``native``; ``maps_eval``: the grid),
  the geometry, every image's ``(height, width)``, and the time and tiles per image;
* ``threshold.json``: the thresholds and how they were chosen.

Thresholds are chosen on **normal data only** (the input has no labels), one for all classes since an
unlabelled image has no class:

* ``calibration=train`` (default): the run's training images, which are normal by construction, up to
  ``calibration_max_images`` spread evenly over the classes; ``calibration=<folder>``: any folder of normal
  images; ``calibration=none``: no calibration;
* image threshold = the ``quantile`` (default 1.0, the maximum) of their image scores: with 1.0 none of the
  calibration images would be flagged. An image is *anomalous* when its score is strictly above it;
* pixel threshold = the same quantile of their per-image map maxima (of the map every native map is
  resampled from, so a bilinear resample never exceeds it), so that the calibration images' masks stay
  empty;
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
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from mcad.config import config_dir
from mcad.data.dataset import AnomalyDataset, collate_samples
from mcad.data.geometry import Placement, to_native
from mcad.data.io import is_image_file, load_image
from mcad.data.records import SampleRecord
from mcad.logging.render import blend, draw_region, heat_map, write_png
from mcad.runs import find_run_dir, load_run_config, load_trained_method
from mcad.utils.files import atomic_write_text

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
    """The run's test pipeline (geometry included) over unlabelled files."""
    records = [SampleRecord(str(f), None, 0, UNLABELLED, "unknown") for f in files]
    return datamodule.inference_dataset(records, [UNLABELLED])


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def score_images(
    method: Any, dataset: AnomalyDataset, batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Yields ``(batch, outputs)`` of the method's predict path, batch by batch.

    ``outputs`` holds ``anomaly_map`` (``(B, H, W)`` numpy on the evaluation grid), ``score`` (``(B,)``
    numpy), ``content_map`` (per image the map before the resize to the grid), ``window``, ``placement``
    and ``tiles`` (see :meth:`mcad.methods.base.AnomalyModule.predict_step`), and ``seconds`` (of the batch).
    """
    # Tiled images of different sizes are batched as lists (the test loader does the same).
    collate = collate_samples if dataset.geometry.kind == "tile" else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    for i, batch in enumerate(loader):
        batch = dict(batch)
        started = time.perf_counter()
        image = batch["image"]
        batch["image"] = image.to(device) if isinstance(image, torch.Tensor) else [x.to(device) for x in image]
        out = method.predict_step(batch, i)
        out["anomaly_map"] = out["anomaly_map"].float().numpy()
        out["score"] = out["score"].double().numpy()
        out["content_map"] = [m.float().numpy() for m in out["content_map"]]
        out["seconds"] = time.perf_counter() - started
        yield batch, out


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
    dataset = _dataset(files, datamodule)
    for _, out in score_images(method, dataset, int(cfg.batch_size), int(cfg.num_workers), device):
        scores += out["score"].tolist()
        # The content maps: every native map is a bilinear resample of one, so it never exceeds its maximum.
        maxima += [float(m.max()) for m in out["content_map"]]
        minima += [float(m.min()) for m in out["content_map"]]
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


def write_overlay(
    output: Path, stem: Path, image: np.ndarray, amap: np.ndarray, low: float | None, t_pixel: float | None
) -> None:
    """``maps/<stem>.png`` (heat-map overlay, region outlined) and ``masks/<stem>.png`` at the map's size.

    Colour scale: blue = ``low`` (the lowest calibration value), the middle = the pixel threshold, red = as
    far above it as ``low`` is below (the map's own range without calibration).
    """
    lo = low if low is not None else float(amap.min())
    hi = 2 * t_pixel - lo if t_pixel is not None and t_pixel > lo else float(amap.max())
    overlay = blend(image, heat_map(amap, lo, hi))
    if t_pixel is not None:
        region = amap > t_pixel
        overlay = draw_region(overlay, region, (255, 0, 0))
        mask = np.repeat(region[..., None] * 255, 3, 2).astype(np.uint8)
        write_png(output / "masks" / stem.with_suffix(".png"), mask)
    write_png(output / "maps" / stem.with_suffix(".png"), overlay)


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
    method, datamodule = load_trained_method(run_cfg, ckpt)
    method.to(device)
    root, files = list_images(cfg.input)
    thresholds = calibrate(cfg, method, datamodule, device)
    t_image, t_pixel = thresholds["image_threshold"], thresholds["pixel_threshold"]
    low = thresholds.get("map_low")
    rows: list[dict[str, Any]] = []
    sizes: dict[str, list[int]] = {}
    seconds, tiles = 0.0, 0
    dataset = _dataset(files, datamodule)
    grid = list(method.protocol.eval_hw)
    for batch, out in score_images(method, dataset, int(cfg.batch_size), int(cfg.num_workers), device):
        seconds += out["seconds"]
        tiles += int(out["tiles"].sum())
        for i, eval_map in enumerate(out["anomaly_map"]):
            file = Path(batch["path"][i])
            stem = _relative_stem(file, root)
            score = float(out["score"][i])
            placement = Placement.from_tensor(out["placement"][i])
            native = to_native(out["content_map"][i], out["window"][i].tolist(), placement)
            height, width = placement.original
            sizes[str(stem)] = [height, width]
            if cfg.save_npy:
                for folder, array in (("maps", native), ("maps_eval", eval_map)):
                    npy = output / folder / stem.with_suffix(".npy")
                    npy.parent.mkdir(parents=True, exist_ok=True)
                    np.save(npy, array.astype(np.float32))
            if cfg.save_png:
                write_overlay(output, stem, load_image(file), native, low, t_pixel)
            rows.append({
                "path": str(file),
                "score": score,
                "anomalous": "" if t_image is None else int(score > t_image),
                "image_threshold": "" if t_image is None else t_image,
                "height": height,
                "width": width,
            })  # fmt: skip
    geometry = datamodule.geometry
    size_record = {
        "maps": "native: each image's own (height, width), listed under 'images'",
        "masks": "native: each image's own (height, width)",
        "maps_eval": {"height": grid[0], "width": grid[1], "note": "the protocol's evaluation grid"},
        "geometry": geometry.describe(),
        "seconds_per_image": seconds / len(rows) if rows else None,
        "tiles_per_image": tiles / len(rows) if rows else None,
        "images": sizes,
    }
    atomic_write_text(output / "size.json", json.dumps(size_record, indent=2) + "\n")
    buf = io.StringIO()
    fields = ["path", "score", "anomalous", "image_threshold", "height", "width"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
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
        "geometry": datamodule.geometry.describe(),
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
