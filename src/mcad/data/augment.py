"""Second-view augmentation for CCL's contrastive losses.

Official recipe (LGC-AD/AD-LGC ``configs/rd/rd_mvtec.py`` ``data.aug_transforms``, torchvision on PIL):
RandomResizedCrop(256, scale 0.8–1.0) → RandomHorizontalFlip 0.5 → RandomVerticalFlip 0.5 →
ColorJitter(0.4, 0.4, 0.4, 0.1) → RandomGrayscale 0.2 → GaussianBlur(k=23, σ∈[0.1, 2]) →
RandomRotation(15) → ToTensor → Normalize(ImageNet). Here it is expressed with albumentations 2.x on an
HWC uint8 RGB array. Per E-CCL5 the view is cut from the **full-resolution** image (not from the 256×256
resized clean view). The torchvision transforms that have no probability argument always fire, so the
corresponding albumentations transforms get ``p=1``; RandomRotation's defaults (nearest interpolation,
zero fill, no expansion) are matched explicitly. ColorJitter also applies its four adjustments in random
order, like torchvision. Small numerical differences to torchvision/PIL remain (resampling kernels, hue
arithmetic on uint8) — they are irrelevant for a random augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import cv2
import torch
from albumentations.pytorch import ToTensorV2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "contrastive_view_transform", "reseed_from_torch"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def contrastive_view_transform(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_scale: tuple[float, float] = (0.8, 1.0),
    rotate_limit: float = 15.0,
    blur_kernel: int | tuple[int, int] = 23,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    seed: int | None = None,
) -> A.Compose:
    """Build the CCL augmented-view pipeline (defaults = the official RD+CCL MVTec/VisA recipe).

    Args:
        image_size: Output size s (square) or (h, w).
        mean: Normalisation mean (in [0, 1] units; pixel values are divided by 255 first).
        std: Normalisation std.
        crop_scale: RandomResizedCrop area range (official RD: (0.8, 1.0); ViTAD+CCL config: (0.7, 1.0)).
        rotate_limit: Max absolute rotation in degrees (official RD: 15; ViTAD+CCL: 30).
        blur_kernel: Gaussian kernel size, odd int or (min, max) range of odd sizes (official RD: 23).
        blur_sigma: Gaussian σ range (official: (0.1, 2.0)).
        seed: Seed of the pipeline's own random generators (albumentations ≥ 2 ``Compose(seed=...)``);
            ``None`` = seeded from OS entropy at construction. Either way the RNG state lives in the
            object, so forked DataLoader workers start from identical copies (and, without persistent
            workers, restart from the same state every epoch) — call :func:`reseed_from_torch` in the
            ``worker_init_fn``.

    Returns:
        An ``A.Compose``; call it as ``transform(image=img_uint8_hwc_rgb)["image"]`` to get a
        (3, h, w) float32 tensor.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    ks = (blur_kernel, blur_kernel) if isinstance(blur_kernel, int) else tuple(blur_kernel)
    return A.Compose(
        [
            # Area interpolation when the crop shrinks (a view cut from a full-resolution file): torchvision's
            # RandomResizedCrop on a PIL image, as in the official loader, antialiases; plain bilinear aliases.
            A.RandomResizedCrop(size=(h, w), scale=crop_scale, ratio=(3 / 4, 4 / 3), area_for_downscale="image", p=1.0),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.0),
            A.ToGray(num_output_channels=3, method="weighted_average", p=0.2),
            A.GaussianBlur(blur_limit=ks, sigma_limit=blur_sigma, p=1.0),
            A.Rotate(
                limit=rotate_limit,
                interpolation=cv2.INTER_NEAREST,
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                crop_border=False,
                p=1.0,
            ),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            ToTensorV2(),
        ],
        seed=seed,
    )


def reseed_from_torch(transform: A.BaseCompose) -> int:
    """Re-seed an albumentations pipeline from ``torch.initial_seed()``; call it in a ``worker_init_fn``.

    Inside a DataLoader worker ``torch.initial_seed()`` is ``base_seed + worker_id`` with ``base_seed``
    drawn from the main process's torch RNG for every epoch, so the views differ across workers and epochs
    yet are reproducible under a global ``torch.manual_seed`` (e.g. Lightning's ``seed_everything``).
    albumentations 2.0 keeps its own RNG in the ``Compose`` object and does not do this by itself.

    Returns:
        The seed that was set.
    """
    seed = int(torch.initial_seed() % 2**32)
    transform.set_random_seed(seed)
    return seed
