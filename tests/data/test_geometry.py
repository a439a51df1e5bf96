"""Input geometry (mcad.data.geometry): sizes, placements, tiles, and the inverse transform round trip."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mcad.data.dataset import AnomalyDataset, collate_samples
from mcad.data.geometry import Geometry, Placement, tile_positions, to_native
from mcad.data.records import SampleRecord
from mcad.data.transforms import Normalizer, Resize, build_transform
from mcad.evaluation.stitching import stitch


def test_load_sizes_and_placements():
    squash = Geometry("squash", 256)
    assert squash.load_size(576, 768) == (256, 256)
    assert squash.placement(576, 768) == Placement((576, 768), (256, 256), (0, 0), (256, 256))
    # CenterCrop starts at (256 - 224) // 2 = 16: the content's top-left lies 16 px above and left of the input
    assert Geometry("squash", 256, 224).placement(576, 768).offset == (-16, -16)

    keep = Geometry("keep_aspect", 256)
    assert keep.load_size(768, 576) == (256, 192) and keep.load_size(192, 768) == (64, 256)
    p = keep.placement(768, 576)
    assert p.offset == (0, 32) and p.window() == (0, 256, 32, 224)
    cropped = Geometry("keep_aspect", 256, 224).placement(768, 576)
    assert cropped.offset == (-16, 16) and cropped.window() == (0, 224, 16, 208)

    tile = Geometry("tile", 256)
    assert tile.load_size(900, 900) == (900, 900)
    assert Geometry("tile", 256, tile_scale=0.5).load_size(900, 1200) == (450, 600)
    assert Geometry("tile", 256, tile_max_side=600).load_size(900, 1200) == (450, 600)
    # never thinner than a tile: a 192-px strip is enlarged to 256 rows (no invented padding)
    assert Geometry("tile", 256).load_size(192, 768) == (256, 1024)
    assert tile.placement(576, 768) == Placement((576, 768), (576, 768), (0, 0), (576, 768))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "stretch"}, "data.geometry"),
        ({"kind": "tile", "crop_size": 224}, "crop_size"),
        ({"kind": "tile", "tile_overlap": 1.0}, "tile_overlap"),
        ({"kind": "tile", "tile_scale": 0.0}, "tile_scale"),
        ({"kind": "tile", "tile_max_side": 100}, "tile_max_side"),
    ],
)
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Geometry(size=256, **kwargs)


@pytest.mark.parametrize(
    "length, tile, overlap", [(1024, 256, 0.25), (900, 256, 0.0), (768, 256, 0.5), (257, 256, 0.25)]
)
def test_tiles_cover_flush_with_the_requested_overlap(length, tile, overlap):
    starts = tile_positions(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == length
    strides = np.diff(starts)
    assert (strides > 0).all() and (strides <= tile * (1 - overlap)).all()
    assert tile_positions(tile, tile, overlap) == [0]


def test_to_native_equals_cv2_resize_without_crop_or_padding():
    rng = np.random.default_rng(0)
    amap = rng.random((64, 64)).astype(np.float32)
    placement = Geometry("squash", 64).placement(150, 420)
    out = to_native(amap, (0, 64, 0, 64), placement)
    assert out.shape == (150, 420)
    np.testing.assert_allclose(out, cv2.resize(amap, (420, 150), interpolation=cv2.INTER_LINEAR), atol=2e-3)


def _scene(height: int, width: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A smooth gradient with one bright square: a map drawn at the image's own size."""
    y, x = np.mgrid[0:height, 0:width]
    scene = 40 + 60 * (x / width) + 30 * (y / height)
    top, left = int(height * 0.55), int(width * 0.35)
    side = max(12, min(height, width) // 8)
    scene[top : top + side, left : left + side] = 240
    return scene.astype(np.uint8), (top + side / 2, left + side / 2)


def _centroid(values: np.ndarray, level: float) -> tuple[float, float]:
    ys, xs = np.nonzero(values > level)
    return float(ys.mean() + 0.5), float(xs.mean() + 0.5)


@pytest.mark.parametrize(
    "geometry",
    [
        Geometry("squash", 96),
        Geometry("squash", 96, crop_size=80),
        Geometry("keep_aspect", 96),
        Geometry("keep_aspect", 96, crop_size=80),
        Geometry("tile", 64, tile_scale=0.5, tile_overlap=0.25),
    ],
    ids=["squash", "squash_crop", "keep_aspect", "keep_aspect_crop", "tile"],
)
def test_a_native_map_comes_back_where_it_was(tmp_path, geometry):
    """Forward (the dataset's own pipeline) then inverse (to_native) puts a drawn map back in place."""
    height, width = 210, 560
    scene, centre = _scene(height, width)
    path = tmp_path / "scene.png"
    Image.fromarray(np.repeat(scene[..., None], 3, 2)).save(path)
    resize = Resize(geometry.size, "area", geometry=None if geometry.kind == "squash" else geometry)
    dataset = AnomalyDataset([SampleRecord(str(path), None, 0, "c")], ["c"], resize,
                             build_transform(geometry.crop_size), Normalizer([0, 0, 0], [1, 1, 1]),
                             geometry=geometry)  # fmt: skip
    item = dataset[0]
    placement = Placement.from_tensor(item["placement"])
    assert placement.original == (height, width)
    seen = item["image"][0] * 255.0  # the model input, channel 0, back in grey levels
    window = placement.window()
    if geometry.kind == "tile":
        grid = item["tile_grid"]
        side = item["tile_size"]
        tiles = torch.stack([seen[y : y + side, x : x + side] for y, x in grid.tolist()])
        covered = stitch(tiles, grid, seen.shape)  # what an identity method's stitched map would be
        torch.testing.assert_close(covered, seen)
        amap = covered.numpy()
    else:
        amap = seen[window[0] : window[1], window[2] : window[3]].numpy()
        if geometry.kind == "keep_aspect":  # the padding is not part of the content window
            assert amap.shape == placement.content or geometry.crop_size
    native = to_native(amap, window, placement)
    assert native.shape == (height, width)
    # The pixels the model saw: everything, or the crop window mapped back onto the image.
    rows = (np.arange(height) + 0.5) * placement.scale[0] + placement.offset[0]
    cols = (np.arange(width) + 0.5) * placement.scale[1] + placement.offset[1]
    inside = ((rows >= window[0]) & (rows < window[1]))[:, None] & ((cols >= window[2]) & (cols < window[3]))[None]
    assert inside.mean() > 0.6
    assert (native[~inside] == amap.min()).all()
    error = np.abs(native - scene)[inside]
    # Down- then up-sampling blurs the square's edges only: most pixels come back within a grey level or two.
    assert np.median(error) < 2.0, np.median(error)
    cy, cx = _centroid(np.where(inside, native, 0), 140)
    assert abs(cy - centre[0]) < 1.5 and abs(cx - centre[1]) < 1.5, ((cy, cx), centre)


def test_keep_aspect_pads_with_the_mean_colour_and_an_empty_mask(tmp_path):
    path = tmp_path / "wide.png"
    Image.fromarray(np.full((50, 200, 3), 200, np.uint8)).save(path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    geometry = Geometry("keep_aspect", 64)
    dataset = AnomalyDataset([SampleRecord(str(path), None, 0, "c")], ["c"], Resize(64, geometry=geometry),
                             build_transform(None), Normalizer(mean, std), geometry=geometry)  # fmt: skip
    item = dataset[0]
    top, bottom, left, right = Placement.from_tensor(item["placement"]).window()
    assert (top, bottom, left, right) == (24, 40, 0, 64)  # 50x200 -> 16x64, centred
    padding = torch.cat([item["image"][:, :top], item["image"][:, bottom:]], dim=1)
    assert padding.abs().max() < 0.01  # the mean colour, about 0 once normalised
    assert item["mask"].sum() == 0


def test_training_tiles_follow_the_sample_seed_and_test_items_carry_their_grid(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(80, 300), (120, 160)]):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    records = [SampleRecord(str(p), None, 0, "c") for p in paths]
    geometry = Geometry("tile", 64, tile_overlap=0.5)

    def dataset(draw: bool) -> AnomalyDataset:
        return AnomalyDataset(records, ["c"], Resize(64, geometry=geometry), build_transform(None),
                              Normalizer([0, 0, 0], [1, 1, 1]), geometry=geometry, draw_tiles=draw,
                              tile_batch=5)  # fmt: skip

    train = dataset(True)
    a, b, c = train[(0, 7)], train[(0, 7)], train[(0, 8)]
    assert a["image"].shape == (3, 64, 64) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["image"], c["image"])
    # the placement of a training tile is the tile's position in the working image
    p = Placement.from_tensor(a["placement"])
    full = dataset(False)[0]["image"]
    torch.testing.assert_close(a["image"], full[:, -p.offset[0] : -p.offset[0] + 64, -p.offset[1] : -p.offset[1] + 64])

    test = dataset(False)
    items = [test[0], test[1]]
    assert items[0]["image"].shape == (3, 80, 300) and items[0]["tile_batch"] == 5 and items[0]["tile_size"] == 64
    ys, xs = tile_positions(80, 64, 0.5), tile_positions(300, 64, 0.5)
    assert ys == [0, 16] and len(xs) == 9
    assert items[0]["tile_grid"].tolist() == [[y, x] for y in ys for x in xs]
    batch = collate_samples(items)
    assert isinstance(batch["image"], list) and [t.shape[-2:] for t in batch["image"]] == [(80, 300), (120, 160)]
    assert batch["placement"].shape == (2, 8) and batch["geometry"] == ["tile", "tile"]
