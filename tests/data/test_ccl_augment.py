"""Tests of CCL's second-view augmentation pipeline."""

from __future__ import annotations

import albumentations as A
import numpy as np
import torch

from mcad.data.augment import IMAGENET_MEAN, IMAGENET_STD, contrastive_view_transform, reseed_from_torch


def _image(seed=0, h=120, w=100):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_recipe_order_and_parameters():
    t = contrastive_view_transform(64)
    names = [type(x).__name__ for x in t.transforms]
    assert names == [
        "RandomResizedCrop",
        "HorizontalFlip",
        "VerticalFlip",
        "ColorJitter",
        "ToGray",
        "GaussianBlur",
        "Rotate",
        "Normalize",
        "ToTensorV2",
    ]
    rrc, hf, vf, cj, gray, blur, rot = t.transforms[:7]
    assert tuple(rrc.scale) == (0.8, 1.0) and tuple(rrc.size) == (64, 64) and rrc.p == 1.0
    assert hf.p == 0.5 and vf.p == 0.5 and gray.p == 0.2
    assert cj.p == 1.0 and blur.p == 1.0 and rot.p == 1.0
    assert tuple(blur.blur_limit) == (23, 23) and tuple(blur.sigma_limit) == (0.1, 2.0)
    assert tuple(rot.limit) == (-15, 15)


def test_output_shape_dtype_and_normalisation():
    out = contrastive_view_transform(64, seed=0)(image=_image())["image"]
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    # values are in ImageNet-normalised units
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    assert out.min() >= lo - 1e-5 and out.max() <= hi + 1e-5
    rect = contrastive_view_transform((48, 32), seed=0)(image=_image())["image"]
    assert rect.shape == (3, 48, 32)


def test_deterministic_under_compose_seed():
    img = _image()
    a = contrastive_view_transform(64, seed=3)
    b = contrastive_view_transform(64, seed=3)
    c = contrastive_view_transform(64, seed=4)
    outs_a = [a(image=img)["image"] for _ in range(3)]
    outs_b = [b(image=img)["image"] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(outs_a, outs_b))
    assert not torch.equal(outs_a[0], outs_a[1])  # successive calls still differ
    assert not torch.equal(outs_a[0], c(image=img)["image"])


def test_reseed_from_torch():
    img = _image()
    t = contrastive_view_transform(32)
    torch.manual_seed(11)
    s1 = reseed_from_torch(t)
    o1 = t(image=img)["image"]
    torch.manual_seed(11)
    s2 = reseed_from_torch(t)
    assert s1 == s2 == 11
    assert torch.equal(o1, t(image=img)["image"])
    assert isinstance(t, A.Compose)


def test_crop_from_a_large_image_is_antialiased():
    # A 1-pixel checkerboard shrunk 8x: area interpolation averages it to flat grey, plain bilinear sampling
    # (no antialiasing) keeps a pattern. The view of a full-resolution file (E-CCL5) must be the former, as
    # torchvision's RandomResizedCrop on a PIL image in the official loader.
    board = (np.indices((512, 512)).sum(axis=0) % 2 * 255).astype(np.uint8)
    board = np.repeat(board[..., None], 3, axis=2)
    crop = contrastive_view_transform(64, seed=0).transforms[0]
    assert crop.area_for_downscale == "image"
    out = A.Compose([crop], seed=0)(image=board)["image"].astype(np.float32)
    aliased = A.Compose([A.RandomResizedCrop(size=(64, 64), scale=(0.8, 1.0), p=1.0)], seed=0)(image=board)["image"]
    assert out.shape == (64, 64, 3)
    assert out.std() < 10 < aliased.astype(np.float32).std()
