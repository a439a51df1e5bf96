"""Geometry-aware evaluation (mcad.evaluation.stitching) with stand-in methods whose maps are known."""

import pytest
import torch
import torch.nn.functional as F

from mcad.data.geometry import Geometry
from mcad.evaluation.protocol import AnomalyMaps, EvalProtocol
from mcad.evaluation.stitching import evaluate_batch, resize_to_grid, stitch


class Identity:
    """A stand-in method whose raw map is its input's first channel, pooled by ``stride`` (a coarse level)."""

    def __init__(self, stride: int = 1) -> None:
        self.stride = stride
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, images: torch.Tensor) -> AnomalyMaps:
        self.calls.append(tuple(images.shape))
        return AnomalyMaps(F.avg_pool2d(images[:, :1], self.stride) if self.stride > 1 else images[:, :1].clone())


def test_stitch_averages_overlaps_and_refuses_gaps():
    tiles = torch.stack([torch.full((4, 4), 1.0), torch.full((4, 4), 3.0)])
    out = stitch(tiles, [(0, 0), (0, 2)], (4, 6))
    assert out[:, :2].eq(1).all() and out[:, 2:4].eq(2).all() and out[:, 4:].eq(3).all()
    with pytest.raises(ValueError, match="do not cover"):
        stitch(tiles, [(0, 0), (0, 3)], (4, 8))


def test_squash_batches_are_the_protocol_exactly():
    protocol = EvalProtocol(eval_size=32)
    images, masks = torch.randn(3, 3, 32, 32), (torch.rand(3, 1, 32, 32) > 0.9).float()
    method = Identity(stride=4)
    out = evaluate_batch(method, protocol, {"image": images, "mask": masks})
    maps, scores = protocol.process(method(images).anomaly_map)
    assert torch.equal(out.pixel_maps, maps) and torch.equal(out.scores, scores)
    assert torch.equal(out.masks, protocol.binarize_masks(masks))
    assert out.windows.tolist() == [[0, 32, 0, 32]] * 3 and out.tiles.tolist() == [1, 1, 1]


def test_keep_aspect_excludes_the_padding_from_scores_and_pixel_metrics():
    geometry = Geometry("keep_aspect", 64)
    placement = geometry.placement(100, 400)  # content 16 x 64 at rows 24..40
    top, bottom, left, right = placement.window()
    images = torch.zeros(1, 3, 64, 64)
    images[0, 0, :top] = 50.0  # a "hot" padding: must not reach the score or the metrics
    images[0, 0, top:bottom] = torch.linspace(0, 1, 64)
    masks = torch.zeros(1, 1, 64, 64)
    masks[0, 0, top:bottom, 40:50] = 1
    protocol = EvalProtocol(eval_shape=(8, 32), smoothing="none")
    batch = {"image": images, "mask": masks, "geometry": ["keep_aspect"], "placement": placement.to_tensor()[None]}
    out = evaluate_batch(Identity(), protocol, batch)
    assert out.pixel_maps.shape == (1, 8, 32) and out.masks.shape == (1, 8, 32)
    assert out.content_maps[0].shape == (bottom - top, right - left)
    assert float(out.scores[0]) == pytest.approx(1.0)  # the content's maximum, not the padding's 50
    assert float(out.pixel_maps.max()) <= 1.0
    assert out.masks[0].sum() > 0 and out.masks[0, :, :16].sum() == 0


def test_tiles_are_stitched_into_the_whole_image_and_scored_over_it():
    geometry = Geometry("tile", 32, tile_overlap=0.25)
    images = [torch.rand(3, 40, 100), torch.rand(3, 32, 70)]
    images[1][0, 10, 60] = 9.0  # the hottest pixel of the batch, in the second image's last tile
    grids = [torch.tensor(geometry.tile_grid(*im.shape[-2:])) for im in images]
    placements = torch.stack([geometry.placement(*im.shape[-2:]).to_tensor() for im in images])
    masks = [torch.zeros(1, *im.shape[-2:]) for im in images]
    batch = {"image": images, "mask": masks, "geometry": ["tile", "tile"], "placement": placements,
             "tile_grid": grids, "tile_size": torch.tensor([32, 32]), "tile_batch": torch.tensor([4, 4])}  # fmt: skip
    method = Identity()
    protocol = EvalProtocol(eval_shape=(16, 40), smoothing="none")
    out = evaluate_batch(method, protocol, batch)
    assert out.tiles.tolist() == [len(grids[0]), len(grids[1])]
    assert all(shape[1:] == (3, 32, 32) and shape[0] <= 4 for shape in method.calls)
    assert sum(shape[0] for shape in method.calls) == sum(out.tiles.tolist())
    # An identity method's stitched map is the image itself: every tile in its place, overlaps agreeing.
    for content, image in zip(out.content_maps, images):
        torch.testing.assert_close(content, image[0])
    assert float(out.scores[1]) == pytest.approx(9.0) and float(out.scores[0]) < 1.0
    torch.testing.assert_close(out.pixel_maps[1], resize_to_grid(images[1][:1], (16, 40))[0])
    assert out.pixel_maps.shape == (2, 16, 40) and out.masks.shape == (2, 16, 40)


def test_coarse_tile_maps_are_upsampled_to_the_tile_before_stitching():
    geometry = Geometry("tile", 32, tile_overlap=0.5)
    image = torch.zeros(3, 32, 96)
    image[0, :, 40:56] = 1.0
    grid = torch.tensor(geometry.tile_grid(32, 96))
    batch = {"image": image[None], "geometry": ["tile"], "placement": geometry.placement(32, 96).to_tensor()[None],
             "tile_grid": grid[None], "tile_size": torch.tensor([32]), "tile_batch": torch.tensor([8])}  # fmt: skip
    out = evaluate_batch(Identity(stride=8), EvalProtocol(eval_size=32), batch)
    content = out.content_maps[0]
    assert content.shape == (32, 96) and out.masks is None
    assert 40 <= int(content[16].argmax()) <= 56  # the hot band stays where it is in the image


def test_protocol_grids_and_records():
    protocol = EvalProtocol(eval_shape=[24, 96])
    assert protocol.eval_hw == (24, 96) and protocol.to_dict()["eval_shape"] == [24, 96]
    maps, scores = protocol.process([torch.rand(2, 1, 8, 8), torch.rand(2, 1, 4, 4)])
    assert maps.shape == (2, 24, 96) and scores.shape == (2,)
    assert protocol.binarize_masks(torch.ones(2, 1, 64, 64)).shape == (2, 24, 96)
    assert EvalProtocol().eval_hw == (256, 256) and EvalProtocol().to_dict()["eval_shape"] is None
    with pytest.raises(ValueError, match="eval_shape"):
        EvalProtocol(eval_shape=(1, 2, 3))
