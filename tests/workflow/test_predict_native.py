"""mcad-predict and the visualiser write maps, masks and overlays at each image's own resolution and aspect."""

import csv
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from workflow_helpers import compose_entry

from mcad.data.dataset import AnomalyDataset, collate_samples
from mcad.data.geometry import Geometry
from mcad.data.records import SampleRecord
from mcad.data.transforms import Normalizer, Resize, build_transform
from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol
from mcad.logging.visualize import AnomalyMapVisualizer
from mcad.methods.base import AnomalyModule
from mcad.predict import predict


def _photo(path, height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    grey = 100 + 50 * np.sin(x / 31.0) * np.cos(y / 23.0) + rng.normal(0, 5, (height, width))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, 2)).save(path)


@pytest.mark.parametrize(
    "geometry",
    [[], ["+set.data.geometry=keep_aspect"], ["+set.data.geometry=tile", "+set.data.tile_scale=0.25"]],
    ids=["squash", "keep_aspect", "tile"],
)
def test_predict_writes_native_size_outputs(tiny_run, tmp_path, geometry):
    """A 768x576 photo (and a 100x300 strip in the same batch) come back at their own sizes."""
    run, _ = tiny_run
    images = tmp_path / "in"
    _photo(images / "photo.png", 768, 576)
    _photo(images / "strip.png", 100, 300, seed=1)
    out = tmp_path / "pred"
    predict(compose_entry("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={images}",
                                      f"output={out}", "calibration_max_images=4", *geometry]))  # fmt: skip
    sizes = json.loads((out / "size.json").read_text())
    assert sizes["images"] == {"photo": [768, 576], "strip": [100, 300]}
    assert sizes["maps_eval"]["height"] == sizes["maps_eval"]["width"] == 64 and sizes["maps"].startswith("native")
    assert sizes["geometry"]["geometry"] == (geometry[0].split("=")[1] if geometry else "squash")
    assert sizes["tiles_per_image"] >= (2 if geometry and "tile" in geometry[0] else 1)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in csv.DictReader((out / "scores.csv").read_text().splitlines())}
    for stem, (h, w) in sizes["images"].items():
        native = np.load(out / "maps" / f"{stem}.npy")
        evaluated = np.load(out / "maps_eval" / f"{stem}.npy")
        assert native.shape == (h, w) and native.dtype == np.float32 and evaluated.shape == (64, 64)
        assert np.asarray(Image.open(out / "maps" / f"{stem}.png")).shape == (h, w, 3)
        assert np.asarray(Image.open(out / "masks" / f"{stem}.png")).shape == (h, w, 3)
        assert (int(rows[f"{stem}.png"]["height"]), int(rows[f"{stem}.png"]["width"])) == (h, w)
        if not geometry:  # squash: the native map is the evaluated map resized back (the inverse of the squash)
            np.testing.assert_allclose(native, cv2.resize(evaluated, (w, h), interpolation=cv2.INTER_LINEAR), atol=1e-3)
        else:  # the same map, drawn at two resolutions
            assert abs(float(native.mean()) - float(evaluated.mean())) < 0.05 * (float(np.ptp(native)) + 1e-6)


def test_predict_on_a_real_768x576_cookie_photo(tiny_run, tmp_path, real_data_root):
    run, _ = tiny_run
    photo = sorted((real_data_root / "cookie" / "test" / "cracked").glob("*.jpg"))[0]
    out = tmp_path / "pred"
    predict(compose_entry("predict", [f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"input={photo}",
                                      f"output={out}", "calibration_max_images=4"]))  # fmt: skip
    assert np.load(out / "maps" / f"{photo.stem}.npy").shape == (768, 576)
    assert np.asarray(Image.open(out / "maps" / f"{photo.stem}.png")).shape == (768, 576, 3)
    assert np.asarray(Image.open(out / "masks" / f"{photo.stem}.png")).shape == (768, 576, 3)


class _FirstChannel(AnomalyModule):
    """A stand-in method: its map is the input's first channel."""

    def anomaly_maps(self, images: torch.Tensor) -> AnomalyMaps:
        return AnomalyMaps(images[:, :1].clone())


@pytest.mark.parametrize("kind", ["squash", "keep_aspect", "tile"])
@pytest.mark.parametrize("resolution", ["native", "eval"])
def test_visualiser_draws_at_the_images_own_resolution(tmp_path, kind, resolution):
    _photo(tmp_path / "a.png", 120, 300)
    mask = np.zeros((120, 300), np.uint8)
    mask[50:70, 200:230] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    _photo(tmp_path / "b.png", 90, 90, seed=1)
    records = [SampleRecord(str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), 1, "c", "blob"),
               SampleRecord(str(tmp_path / "b.png"), None, 0, "c")]  # fmt: skip
    geometry = Geometry(kind, 64, tile_scale=0.5)
    dataset = AnomalyDataset(records, ["c"], Resize(64, geometry=None if kind == "squash" else geometry),
                             build_transform(None), Normalizer([0.5] * 3, [0.25] * 3), geometry=geometry)  # fmt: skip
    batch = collate_samples([dataset[0], dataset[1]])
    method = _FirstChannel(protocol=EvalProtocol(eval_shape=(32, 48)))
    method.class_names = ["c"]
    method.on_test_epoch_start()
    outputs = method.test_step(batch, 0)
    assert outputs["anomaly_map"].shape == (2, 32, 48) and outputs["gt_mask"][0].sum() > 0

    visualiser = AnomalyMapVisualizer(str(tmp_path / "vis"), select="first", num_per_class=2, resolution=resolution)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(mean=[0.5] * 3, std=[0.25] * 3))
    visualiser.on_test_epoch_start(trainer, method)
    visualiser.on_test_batch_end(trainer, method, outputs, batch, 0)
    visualiser.on_test_end(trainer, method)
    rows = list(csv.DictReader((tmp_path / "vis" / "index.csv").read_text().splitlines()))
    assert len(rows) == 2 == len(visualiser.written)
    for row in rows:
        picture = np.asarray(Image.open(tmp_path / "vis" / row["file"]))
        h, w = (120, 300) if row["path"].endswith("a.png") else (90, 90)
        if resolution == "eval":
            h, w = 32, 48
        assert (int(row["height"]), int(row["width"])) == (h, w)
        assert picture.shape[1] == 4 * w and picture.shape[0] > h  # four tiles side by side, title bars above
