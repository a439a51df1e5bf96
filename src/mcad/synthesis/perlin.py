"""Perlin-noise anomaly synthesizer (DRAEM-style, as used by CRR).

Paraphrase of CRR's `dataset.py::RealIADDataset.transform_image / perlin_synthetic` and `perlin.py`
(Qiqigeww/CRR-MUAD @ cbd2a12); erratum E-CRR4 in docs/codes.md:

1. Perlin noise with `2^a x 2^b` lattice cells, a, b ~ U{0..5} drawn once per sample, rotated by
   U(-90, 90) degrees (bilinear, zero fill - imgaug `Affine` defaults), thresholded at 0.5.
2. Mask = Perlin-binary x foreground estimate; noise (and rotation) is re-drawn up to `max_tries`
   times until the mask is non-empty. If every try is empty the sample is returned unchanged with an
   empty mask, as the official loop does.
3. Anomaly source, 50/50: a texture image (DTD in the paper; procedural textures when no folder is
   given) or a "self-augmented" copy of the image whose 8x8 grid of strips is shuffled by rows and
   columns. Either source is first augmented by 3 distinct random ops out of 10.
4. Blend with beta ~ U(0.2, 0.8): x~ = x (1 - M) + (1 - beta) src M + beta x M.

Everything random is drawn from the `np.random.Generator` passed to the call (albumentations is
re-seeded from it), so a sample is a deterministic function of the image and the generator state.

Deviations from the official code (all minor, named here once):

* augmentations are albumentations equivalents of the imgaug ops (gamma is not per-channel,
  "multiply-and-add to brightness" acts on RGB rather than a luminance channel);
* the official foreground for Real-IAD is a precomputed DIS saliency map; MVTec/VisA have none, so
  `foreground="otsu"` estimates one (ambiguity A-CRR3). A per-image precomputed map is not supported:
  the data layer has no source of such maps for MVTec/VisA, so the option could not be reached;
* images are processed at whatever size they arrive (the official code first resizes to 448 with cv2;
  resizing is the data pipeline's job here).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import albumentations as A
import cv2
import numpy as np
from PIL import Image, ImageOps

from mcad.synthesis.textures import generate_texture, perlin_noise_2d

__all__ = [
    "PerlinSynthesizer",
    "PilAutocontrast",
    "SynthesisSample",
    "estimate_foreground",
    "grid_shuffle",
    "perlin_mask",
    "perlin_noise_2d",
]

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class SynthesisSample:
    """Everything one synthesis draw produced (for tests, debugging and visualisation).

    Attributes:
        image: Synthetic image, uint8 `(H, W, 3)`.
        mask: Anomaly mask, float32 `(H, W)` in {0, 1}.
        source: The augmented anomaly source that was blended in, uint8 `(H, W, 3)`.
        beta: Blend weight of the original image inside the mask.
        source_kind: `"texture"` or `"self"`.
    """

    image: np.ndarray
    mask: np.ndarray
    source: np.ndarray
    beta: float
    source_kind: str


def _rotate(a: np.ndarray, angle_deg: float) -> np.ndarray:
    # Rotation about the centre, bilinear, zero fill: imgaug `Affine(rotate=...)` defaults used by the
    # official `self.rot`. Corners rotated in from outside are 0, hence never above the threshold.
    h, w = a.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), angle_deg, 1.0)
    return cv2.warpAffine(a, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def perlin_mask(
    shape: Sequence[int],
    rng: np.random.Generator,
    scale_exponents: tuple[int, int] = (0, 5),
    threshold: float = 0.5,
    rotation: float = 90.0,
    res: tuple[int, int] | None = None,
) -> np.ndarray:
    """One binary Perlin blob mask.

    Args:
        shape: `(H, W)`.
        rng: Random source.
        scale_exponents: Inclusive range of the exponents a, b of the lattice `2^a x 2^b`.
        threshold: Noise values above it become 1.
        rotation: Rotation angle drawn from U(-rotation, rotation) degrees.
        res: Fixed lattice resolution (the synthesizer draws it once per sample and retries with it,
            as the official loop does); drawn from `scale_exponents` when None.

    Returns:
        float32 `(H, W)` array in {0, 1}.
    """
    if res is None:
        lo, hi = scale_exponents
        res = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
    noise = perlin_noise_2d(shape, res, rng).astype(np.float32)
    noise = _rotate(noise, float(rng.uniform(-rotation, rotation)))
    return (noise > threshold).astype(np.float32)


def estimate_foreground(
    image: np.ndarray,
    blur_sigma: float | None = None,
    min_fraction: float = 0.01,
    max_fraction: float = 0.95,
    max_border_fraction: float = 0.25,
) -> np.ndarray:
    """Cheap object/background split: Otsu threshold on a blurred grayscale image.

    Of the two sides of the threshold the one that touches the image border less is taken as the
    foreground (objects in MVTec/VisA are roughly centred on a uniform background); ties go to the
    smaller side. The estimate is declared degenerate - and all-ones returned, i.e. no restriction -
    when the chosen side covers less than `min_fraction` or more than `max_fraction` of the image, or
    still covers more than `max_border_fraction` of the border pixels (textures, cluttered scenes).

    Args:
        image: uint8 `(H, W, 3)` RGB or `(H, W)` grayscale.
        blur_sigma: Gaussian sigma in pixels; `max(1, min(H, W) / 100)` when None.
        min_fraction: Smallest accepted foreground area fraction.
        max_fraction: Largest accepted foreground area fraction.
        max_border_fraction: Largest accepted fraction of border pixels inside the foreground.

    Returns:
        float32 `(H, W)` array in {0, 1}.
    """
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    gray = np.ascontiguousarray(gray, dtype=np.uint8)
    h, w = gray.shape
    sigma = blur_sigma if blur_sigma is not None else max(1.0, min(h, w) / 100.0)
    blurred = cv2.GaussianBlur(gray, (0, 0), sigmaX=sigma)
    _, binary = cv2.threshold(blurred, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    ones = np.ones((h, w), dtype=np.float32)
    if binary.min() == binary.max():
        return ones

    border = np.zeros((h, w), dtype=bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    candidates = [binary.astype(bool), ~binary.astype(bool)]
    # Sort key: (fraction of the border inside the candidate, area) - less border, then smaller.
    fg = min(candidates, key=lambda c: (float(c[border].mean()), float(c.mean())))
    # Small speckles on the background would let anomalies land there; an opening removes them and a
    # closing fills pin holes in the object.
    k = max(3, (min(h, w) // 64) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    fg_u8 = cv2.morphologyEx(fg.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    fg_u8 = cv2.morphologyEx(fg_u8, cv2.MORPH_CLOSE, kernel)
    fg = fg_u8.astype(bool)

    area = float(fg.mean())
    if not (min_fraction <= area <= max_fraction) or float(fg[border].mean()) > max_border_fraction:
        return ones
    return fg.astype(np.float32)


def grid_shuffle(image: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """Shuffle an image's strips the way CRR's self-augmentation does (E-CRR4).

    Columns: the image is cut into vertical strips of width `W // grid`; even-indexed and odd-indexed
    strips are shuffled separately and laid out evens-then-odds. Rows: the result is cut into horizontal
    strips of height `H // grid`, all strips are shuffled, then again evens and odds separately and laid
    out evens-then-odds. Whole rows/columns of strips move, not 64 independent patches. A remainder
    strip (size not divisible by `grid`) takes part like any other strip, as with the official
    `np.split`.

    Args:
        image: `(H, W, ...)` array.
        rng: Random source.
        grid: Number of strips per axis.

    Returns:
        Array of the same shape and dtype.
    """
    h, w = image.shape[:2]
    gh, gw = max(1, h // grid), max(1, w // grid)

    def permuted(parts: list[np.ndarray]) -> list[np.ndarray]:
        return [parts[i] for i in rng.permutation(len(parts))]

    cols = np.split(image, range(gw, w, gw), axis=1)
    cols = permuted(cols[::2]) + permuted(cols[1::2])
    out = np.concatenate(cols, axis=1)
    rows = permuted(np.split(out, range(gh, h, gh), axis=0))
    rows = permuted(rows[::2]) + permuted(rows[1::2])
    return np.concatenate(rows, axis=0)


class PilAutocontrast(A.ImageOnlyTransform):
    """imgaug's `iaa.pillike.Autocontrast()`: PIL's `ImageOps.autocontrast` with a random integer cutoff.

    imgaug draws the cutoff (in percent, cut from each end of every channel's histogram) per image from
    the discrete uniform `{lo, ..., hi}` (default `(0, 20)`) and calls PIL (its own code path for cutoff 0
    gives PIL's result too). albumentations' `AutoContrast(method="pil")` differs from PIL by up to 3
    grey levels and has a fixed cutoff, so PIL is called directly.

    Args:
        cutoff: Inclusive integer range of the cutoff percentage.
        p: Probability of applying the transform.
    """

    def __init__(self, cutoff: tuple[int, int] = (0, 20), p: float = 1.0) -> None:
        super().__init__(p=p)
        lo, hi = int(cutoff[0]), int(cutoff[1])
        if not 0 <= lo <= hi < 50:
            raise ValueError(f"cutoff must satisfy 0 <= lo <= hi < 50, got {cutoff}")
        self.cutoff = (lo, hi)

    def get_params(self) -> dict[str, int]:
        """One cutoff per image, drawn from albumentations' seeded generator."""
        return {"cutoff": self.py_random.randint(*self.cutoff)}

    def apply(self, img: np.ndarray, cutoff: int = 0, **params: object) -> np.ndarray:
        """PIL autocontrast of a uint8 RGB image."""
        return np.array(ImageOps.autocontrast(Image.fromarray(img), cutoff=cutoff))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        """Names shown in `repr` / serialisation."""
        return ("cutoff",)


def _default_augmenters() -> list[A.BasicTransform]:
    # albumentations stand-ins for the official imgaug list (dataset.py `self.augmenters`), in order.
    return [
        A.RandomGamma(gamma_limit=(50, 200), p=1.0),  # iaa.GammaContrast((0.5, 2.0), per_channel)
        A.Sequential(  # iaa.MultiplyAndAddToBrightness(mul=(0.8, 1.2), add=(-30, 30))
            [
                A.MultiplicativeNoise(multiplier=(0.8, 1.2), p=1.0),
                A.RandomBrightnessContrast(brightness_limit=(-30 / 255, 30 / 255), contrast_limit=(0.0, 0.0), p=1.0),
            ],
            p=1.0,
        ),
        A.Sharpen(alpha=(0.0, 1.0), lightness=(1.0, 1.0), p=1.0),  # iaa.pillike.EnhanceSharpness()
        A.HueSaturationValue(  # iaa.AddToHueAndSaturation((-50, 50), per_channel=True)
            hue_shift_limit=35, sat_shift_limit=50, val_shift_limit=0, p=1.0
        ),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=0.5),  # iaa.Solarize(0.5, threshold=(32, 128))
        A.Posterize(num_bits=(1, 8), p=1.0),  # iaa.Posterize() - imgaug's default nb_bits=(1, 8)
        A.InvertImg(p=1.0),  # iaa.Invert()
        PilAutocontrast(cutoff=(0, 20), p=1.0),  # iaa.pillike.Autocontrast(): cutoff U{0..20} %, PIL
        A.Equalize(p=1.0),  # iaa.pillike.Equalize()
        A.Affine(rotate=(-45, 45), border_mode=cv2.BORDER_CONSTANT, fill=0, p=1.0),  # iaa.Affine(rotate)
    ]


class PerlinSynthesizer:
    """Image-level anomaly synthesizer: Perlin masks x (texture | grid-shuffled self) sources.

    Args:
        texture_root: Folder searched recursively for texture images (e.g. DTD's `images/`); None uses
            procedural textures from `mcad.synthesis.textures` so it works offline.
        foreground: `"none"` (mask anywhere) or `"otsu"` (restrict to `estimate_foreground`).
        beta_range: Range of the blend weight beta of the original image inside the mask.
        max_tries: Perlin draws before giving up on a non-empty mask.
        texture_prob: Probability of a texture source (else the grid-shuffled image); 0.5 in CRR.
        num_augment_ops: Distinct augmentation ops applied to the source; 3 in CRR.
        scale_exponents: Inclusive range of the Perlin lattice exponents; (0, 5) in CRR.
        threshold: Perlin threshold; 0.5 in CRR.
        rotation: Max absolute Perlin rotation in degrees; 90 in CRR.
        grid: Strips per axis of the self-augmentation shuffle; 8 in CRR.
        augmenters: Override of the augmentation op list (albumentations transforms).

    Attributes:
        level: `"image"` - it acts on images, not on features.
    """

    level = "image"

    def __init__(
        self,
        texture_root: str | os.PathLike[str] | None = None,
        foreground: Literal["none", "otsu"] = "none",
        beta_range: tuple[float, float] = (0.2, 0.8),
        max_tries: int = 50,
        texture_prob: float = 0.5,
        num_augment_ops: int = 3,
        scale_exponents: tuple[int, int] = (0, 5),
        threshold: float = 0.5,
        rotation: float = 90.0,
        grid: int = 8,
        augmenters: Sequence[A.BasicTransform] | None = None,
    ) -> None:
        if foreground not in ("none", "otsu"):
            raise ValueError(f"foreground must be 'none' or 'otsu', got {foreground!r}")
        lo, hi = beta_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"beta_range must satisfy 0 <= lo <= hi <= 1, got {beta_range}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        self.texture_root = None if texture_root is None else os.fspath(texture_root)
        self.foreground = foreground
        self.beta_range = (float(lo), float(hi))
        self.max_tries = int(max_tries)
        self.texture_prob = float(texture_prob)
        self.scale_exponents = scale_exponents
        self.threshold = float(threshold)
        self.rotation = float(rotation)
        self.grid = int(grid)
        self.augmenters = list(augmenters) if augmenters is not None else _default_augmenters()
        if not 0 < num_augment_ops <= len(self.augmenters):
            raise ValueError(f"num_augment_ops must be in [1, {len(self.augmenters)}], got {num_augment_ops}")
        self.num_augment_ops = int(num_augment_ops)
        self.texture_paths: list[str] = []
        if self.texture_root is not None:
            pattern = os.path.join(glob.escape(self.texture_root), "**", "*")
            self.texture_paths = sorted(
                p for p in glob.glob(pattern, recursive=True) if p.lower().endswith(_IMAGE_EXTENSIONS)
            )
            if not self.texture_paths:
                raise FileNotFoundError(f"no texture images under texture_root={self.texture_root!r}")

    def __repr__(self) -> str:
        src = f"{len(self.texture_paths)} files" if self.texture_paths else "procedural"
        return (
            f"{type(self).__name__}(textures={src}, foreground={self.foreground!r}, "
            f"beta_range={self.beta_range}, max_tries={self.max_tries})"
        )

    # ------------------------------------------------------------------ parts
    def augment(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Apply `num_augment_ops` distinct random ops (in random order) to a uint8 RGB image."""
        idx = rng.choice(len(self.augmenters), size=self.num_augment_ops, replace=False)
        # A fresh Compose seeded from `rng` makes albumentations' own randomness reproducible.
        pipeline = A.Compose([self.augmenters[i] for i in idx], seed=int(rng.integers(2**31 - 1)))
        return np.ascontiguousarray(pipeline(image=image)["image"])

    def make_mask(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Perlin mask restricted to the foreground; re-drawn up to `max_tries` times until non-empty."""
        h, w = image.shape[:2]
        fg = estimate_foreground(image) if self.foreground == "otsu" else None
        lo, hi = self.scale_exponents
        # The lattice is drawn once and kept across retries (official loop); noise and angle are redrawn.
        res = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
        mask = np.zeros((h, w), dtype=np.float32)
        for _ in range(self.max_tries):
            mask = perlin_mask((h, w), rng, threshold=self.threshold, rotation=self.rotation, res=res)
            if fg is not None:
                mask = mask * fg
            if mask.any():
                break
        return mask.astype(np.float32)

    def make_source(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """Augmented anomaly source of the image's size and its kind (`"texture"` or `"self"`)."""
        h, w = image.shape[:2]
        if rng.random() < self.texture_prob:
            if self.texture_paths:
                path = self.texture_paths[int(rng.integers(len(self.texture_paths)))]
                bgr = cv2.imread(path, cv2.IMREAD_COLOR)
                if bgr is None:
                    raise OSError(f"cannot read texture image {path!r}")
                texture = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (w, h))
            else:
                texture = generate_texture((h, w), rng)
            return self.augment(texture, rng), "texture"
        return grid_shuffle(self.augment(image, rng), rng, self.grid), "self"

    @staticmethod
    def blend(image: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> np.ndarray:
        """x~ = x (1 - M) + (1 - beta) src M + beta x M, computed on the 0..255 scale.

        Working on the 0..255 scale (not /255) makes pixels with M = 0 come back bit-exact; the final
        cast truncates like the official `(img * 255).astype(np.uint8)`.
        """
        x = image.astype(np.float32)
        src = source.astype(np.float32)
        m = mask.astype(np.float32)[..., None]
        out = x * (1.0 - m) + (1.0 - beta) * src * m + beta * x * m
        return np.clip(out, 0.0, 255.0).astype(np.uint8)

    # ------------------------------------------------------------------ API
    def sample(self, image: np.ndarray, rng: np.random.Generator) -> SynthesisSample:
        """Draw one synthetic anomaly and return all its ingredients."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        mask = self.make_mask(image, rng)
        source, kind = self.make_source(image, rng)
        beta = float(rng.uniform(*self.beta_range))
        return SynthesisSample(self.blend(image, source, mask, beta), mask, source, beta, kind)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Synthesize an anomaly on `image`.

        Args:
            image: uint8 `(H, W, 3)` RGB.
            rng: Random source; the output is a deterministic function of its state.

        Returns:
            `(synthetic uint8 (H, W, 3), mask float32 (H, W))`.
        """
        s = self.sample(image, rng)
        return s.image, s.mask
