"""Tests of the Perlin anomaly synthesizer and the procedural textures."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mcad.synthesis.perlin import (
    PerlinSynthesizer,
    estimate_foreground,
    grid_shuffle,
    perlin_mask,
    perlin_noise_2d,
)
from mcad.synthesis.textures import TEXTURE_KINDS, generate_texture

SIZE = 192


def _random_image(seed: int = 0, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = cv2.GaussianBlur(rng.uniform(0, 255, (size, size, 3)).astype(np.float32), (0, 0), 3)
    return np.clip((smooth - smooth.mean()) * 4 + 128, 0, 255).astype(np.uint8)


def _disk_image(size: int = SIZE, radius: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    disk = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    img = np.full((size, size, 3), 40.0)
    img[disk] = (200.0, 170.0, 90.0)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), disk


# ----------------------------------------------------------------------------- noise and textures
def test_perlin_noise_shape_range_and_determinism():
    a = perlin_noise_2d((64, 48), (4, 2), np.random.default_rng(1))
    b = perlin_noise_2d((64, 48), (4, 2), np.random.default_rng(1))
    assert a.shape == (64, 48)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= np.sqrt(2) and a.std() > 0.05
    # lattice corners are zeros of gradient noise
    assert abs(a[0, 0]) < 1e-12 and abs(a[16, 24]) < 1e-12
    # non-divisible shapes are fine
    assert perlin_noise_2d((37, 53), (32, 5), np.random.default_rng(0)).shape == (37, 53)


def test_perlin_mask_binary_and_scales():
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = perlin_mask((SIZE, SIZE), rng)
        assert m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}


@pytest.mark.parametrize("kind", TEXTURE_KINDS)
def test_procedural_textures(kind):
    t = generate_texture((40, 56), np.random.default_rng(3), kind)
    assert t.shape == (40, 56, 3) and t.dtype == np.uint8 and t.std() > 5
    np.testing.assert_array_equal(t, generate_texture((40, 56), np.random.default_rng(3), kind))


def test_grid_shuffle_permutes_whole_rows_and_columns_of_strips():
    size, grid = 64, 8
    cell = size // grid
    ids = np.zeros((size, size, 2), dtype=np.int64)
    ids[..., 0] = np.arange(size)[:, None] // cell  # row-strip id
    ids[..., 1] = np.arange(size)[None, :] // cell  # column-strip id
    out = grid_shuffle(ids, np.random.default_rng(0), grid)
    blocks = out[::cell, ::cell]  # one sample per block
    # every block is intact (constant ids) ...
    np.testing.assert_array_equal(out, np.repeat(np.repeat(blocks, cell, 0), cell, 1))
    # ... row strips move as whole rows, column strips as whole columns
    row_perm, col_perm = blocks[:, 0, 0], blocks[0, :, 1]
    assert (blocks[..., 0] == row_perm[:, None]).all() and (blocks[..., 1] == col_perm[None, :]).all()
    assert sorted(row_perm) == list(range(grid)) and sorted(col_perm) == list(range(grid))
    # column layout: even-indexed strips first, then odd-indexed ones
    assert all(c % 2 == 0 for c in col_perm[:4]) and all(c % 2 == 1 for c in col_perm[4:])


# ----------------------------------------------------------------------------- synthesizer
def test_mask_non_empty_and_outside_pixels_unchanged():
    synth = PerlinSynthesizer()
    assert synth.level == "image"
    img = _random_image()
    for seed in range(8):
        out, mask = synth(img, np.random.default_rng(seed))
        assert out.shape == img.shape and out.dtype == np.uint8
        assert mask.shape == img.shape[:2] and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0
        outside = mask == 0
        np.testing.assert_array_equal(out[outside], img[outside])
        assert (out[~outside] != img[~outside]).any()


def test_beta_recovered_inside_mask():
    synth = PerlinSynthesizer()
    img = _random_image(1)
    betas = []
    for seed in range(12):
        s = synth.sample(img, np.random.default_rng(seed))
        assert 0.2 <= s.beta <= 0.8
        betas.append(s.beta)
        x, src, y = (a.astype(np.float64) for a in (img, s.source, s.image))
        sel = (s.mask[..., None] > 0) & (np.abs(x - src) >= 40)
        if sel.sum() < 10:
            continue
        # y = (1 - beta) src + beta x, truncated to uint8  =>  beta_hat within 1/|x - src| of beta
        beta_hat = (y[sel] - src[sel]) / (x[sel] - src[sel])
        assert np.all(beta_hat >= 0.2 - 0.03) and np.all(beta_hat <= 0.8 + 0.03)
        assert np.abs(beta_hat - s.beta).max() <= 1.0 / 40 + 1e-9
    assert max(betas) - min(betas) > 0.1  # actually random


def test_blend_controlled_case():
    x = np.full((8, 8, 3), 255, np.uint8)
    src = np.zeros((8, 8, 3), np.uint8)
    mask = np.zeros((8, 8), np.float32)
    mask[2:5, 3:6] = 1
    out = PerlinSynthesizer.blend(x, src, mask, beta=0.37)
    assert np.all(out[mask == 1] == int(0.37 * 255))  # (1 - beta) * 0 + beta * 255, truncated
    assert np.all(out[mask == 0] == 255)


def test_deterministic_under_seed():
    synth = PerlinSynthesizer()
    img = _random_image(2)
    for seed in (0, 7, 123):
        a_img, a_mask = synth(img, np.random.default_rng(seed))
        b_img, b_mask = synth(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(a_img, b_img)
        np.testing.assert_array_equal(a_mask, b_mask)
    c_img, _ = synth(img, np.random.default_rng(1))
    assert not np.array_equal(a_img, c_img)


def test_both_sources_without_texture_folder():
    img = _random_image(3)
    kinds = {PerlinSynthesizer().sample(img, np.random.default_rng(s)).source_kind for s in range(10)}
    assert kinds == {"texture", "self"}
    s = PerlinSynthesizer(texture_prob=1.0).sample(img, np.random.default_rng(0))
    assert s.source_kind == "texture" and s.source.shape == img.shape


def test_texture_folder(tmp_path):
    (tmp_path / "banded").mkdir()
    for i in range(2):
        tex = generate_texture((50, 70), np.random.default_rng(i))
        cv2.imwrite(str(tmp_path / "banded" / f"t{i}.jpg"), tex[..., ::-1])
    synth = PerlinSynthesizer(texture_root=tmp_path, texture_prob=1.0)
    assert len(synth.texture_paths) == 2
    out, mask = synth(_random_image(4), np.random.default_rng(0))
    assert out.shape == (SIZE, SIZE, 3) and mask.sum() > 0
    with pytest.raises(FileNotFoundError):
        PerlinSynthesizer(texture_root=tmp_path / "missing")


def test_otsu_foreground_estimate():
    img, disk = _disk_image()
    fg = estimate_foreground(img)
    assert fg.dtype == np.float32
    iou = (fg.astype(bool) & disk).sum() / (fg.astype(bool) | disk).sum()
    assert iou > 0.95
    # dark object on a bright background: polarity picks the central part again
    inv_fg = estimate_foreground(255 - img)
    assert ((inv_fg.astype(bool) & disk).sum() / (inv_fg.astype(bool) | disk).sum()) > 0.95
    # degenerate cases fall back to "no restriction"
    assert estimate_foreground(np.full((64, 64, 3), 90, np.uint8)).min() == 1.0
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::4] = 255  # texture: both sides of the threshold touch the border
    assert estimate_foreground(stripes).min() == 1.0
    checker = generate_texture((96, 96), np.random.default_rng(0), "checker")
    assert estimate_foreground(checker).min() == 1.0


def test_otsu_restricts_mask_to_foreground():
    img, disk = _disk_image(seed=1)
    grown = cv2.dilate(disk.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
    synth = PerlinSynthesizer(foreground="otsu")
    for seed in range(8):
        out, mask = synth(img, np.random.default_rng(seed))
        assert mask.sum() > 0
        assert mask[~grown].sum() == 0
        np.testing.assert_array_equal(out[~grown], img[~grown])


def test_synthesizer_validation():
    img = _random_image(5)
    with pytest.raises(ValueError):
        PerlinSynthesizer(foreground="dis")
    with pytest.raises(ValueError):
        PerlinSynthesizer()(img.astype(np.float32), np.random.default_rng(0))
