"""AUPRO against a plain sort-and-sweep reference and a literal per-threshold brute force."""

import numpy as np
import pytest
import torch
from metrics_reference import FOUR, aupro_bruteforce, aupro_reference, random_maps, random_masks

from mcad.metrics import UndefinedMetricWarning, aupro, pixel_metrics

TOL = 1e-9  # exact engine; docs/evaluation.md only promises 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_reference_agrees_with_bruteforce(seed):
    # Validates the reference itself on tiny inputs (every distinct score counted directly).
    rng = np.random.default_rng(seed)
    masks = random_masks(rng, 3, 10, 10, empty_fraction=0.0)
    maps = random_maps(rng, masks)
    if seed % 2:
        maps = np.round(maps, 1)
    for limit in (0.3, 0.05, 1.0):
        assert aupro_reference(maps, masks, limit) == pytest.approx(aupro_bruteforce(maps, masks, limit), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_random_maps_match_reference(seed, dtype):
    rng = np.random.default_rng(100 + seed)
    masks = random_masks(rng, 16, 64, 64, max_regions=4)
    maps = random_maps(rng, masks, signal=rng.uniform(0.2, 3.0), dtype=dtype)
    for limit in (0.3, 0.01, 0.7, 1.0):
        assert abs(aupro(maps, masks, limit) - aupro_reference(maps, masks, limit)) <= TOL


@pytest.mark.parametrize("step", [0.5, 0.1, 0.01])
def test_heavy_ties_match_reference(step):
    rng = np.random.default_rng(int(1 / step))
    masks = random_masks(rng, 10, 40, 40)
    maps = np.round(random_maps(rng, masks) / step) * step
    for limit in (0.3, 0.05):
        assert abs(aupro(maps, masks, limit) - aupro_reference(maps, masks, limit)) <= TOL


def test_limit_falls_inside_a_tie_group():
    # The FPR limit lies inside the step of a tie group that mixes normal and region pixels:
    # the point at exactly 0.3 must be interpolated on that (diagonal) step.
    maps = np.zeros((1, 4, 5))
    masks = np.zeros((1, 4, 5), dtype=np.uint8)
    masks[0, 0, :2] = 1
    maps[0, 0, :2] = 1.0  # region pixels and 6 of 18 normal pixels share the score 1.0
    maps[0, 1, :] = 1.0
    maps[0, 2, 0] = 1.0
    for limit in (0.3, 0.2, 0.5):
        assert abs(aupro(maps, masks, limit) - aupro_bruteforce(maps, masks, limit)) <= 1e-12


def test_eight_connectivity():
    # Two diagonal pixels form ONE region under 8-connectivity (two under 4-connectivity).
    masks = np.zeros((1, 6, 6), dtype=np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1
    masks[0, 4, 4] = 1
    maps = np.random.default_rng(0).random((1, 6, 6))
    maps[0, 1, 1], maps[0, 2, 2], maps[0, 4, 4] = 0.99, 0.05, 0.5
    ours = aupro(maps, masks)
    assert ours == pytest.approx(aupro_reference(maps, masks), abs=1e-12)
    assert abs(ours - aupro_reference(maps, masks, structure=FOUR)) > 1e-3


def test_regions_do_not_connect_across_images():
    masks = np.zeros((2, 4, 4), dtype=np.uint8)
    masks[:, 1:3, 1:3] = 1  # same place in both maps: two regions, not one
    maps = np.random.default_rng(1).random((2, 4, 4))
    assert aupro(maps, masks) == pytest.approx(aupro_reference(maps, masks), abs=1e-12)


def test_small_hand_computed_example():
    # 1 region of 2 pixels, 4 normal pixels; scores: region 0.9, 0.4; normal 0.8, 0.3, 0.2, 0.1.
    maps = np.array([[[0.9, 0.4, 0.8], [0.3, 0.2, 0.1]]])
    masks = np.array([[[1, 1, 0], [0, 0, 0]]], dtype=np.uint8)
    # Curve: (0,0)->(0,.5)->(.25,.5)->(.25,1)->... ; area up to 0.3 = 0.25*0.5 + 0.05*1 = 0.175
    assert aupro(maps, masks, 0.3) == pytest.approx(0.175 / 0.3, abs=1e-12)


def test_perfect_inverted_and_bounded():
    rng = np.random.default_rng(2)
    masks = random_masks(rng, 6, 32, 32, empty_fraction=0.0)
    assert aupro(masks.astype(float), masks) == 1.0
    assert aupro(-masks.astype(float), masks) == 0.0
    for _ in range(5):
        value = aupro(rng.standard_normal(masks.shape) * 1e3 - 7, masks)
        assert 0.0 <= value <= 1.0


def test_scores_outside_unit_interval_and_torch_inputs():
    rng = np.random.default_rng(3)
    masks = random_masks(rng, 8, 32, 32)
    maps = random_maps(rng, masks, dtype=np.float64) * 1e4 - 3e3
    ref = aupro_reference(maps, masks)
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks).bool()) == pytest.approx(ref, abs=TOL)
    assert aupro(maps[:, None], masks[:, None]) == pytest.approx(ref, abs=TOL)  # (N, 1, H, W)
    assert pixel_metrics(maps, masks)["AUPRO"] == pytest.approx(ref, abs=TOL)


def test_degenerate_inputs():
    maps = np.random.default_rng(0).random((2, 8, 8))
    with pytest.warns(UndefinedMetricWarning, match="AUPRO"):
        assert np.isnan(aupro(maps, np.zeros((2, 8, 8), dtype=np.uint8)))
    with pytest.warns(UndefinedMetricWarning, match="AUPRO"):
        assert np.isnan(aupro(maps, np.ones((2, 8, 8), dtype=np.uint8)))
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, 2, 2] = 1
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(ValueError, match="binary"):
        aupro(maps, masks * 0.5)
    with pytest.raises(ValueError, match="same shape"):
        aupro(maps, masks[:1])
