"""Procedural noise and textures for offline anomaly synthesis.

Two things live here because both the Perlin synthesizer (`mcad.synthesis.perlin`) and the procedural
texture generator need them, and keeping them in one leaf module avoids an import cycle:

* `perlin_noise_2d` - gradient (Perlin) noise with the DRAEM construction that CRR's `perlin.py`
  (`rand_perlin_2d_np`) uses, but drawing its random gradients from an explicit `np.random.Generator`
  and accepting shapes that are not multiples of the lattice resolution.
* `generate_texture` - cheap, seedable stand-ins for DTD texture images, so the synthesizer works on a
  machine with no texture folder (tests, CI, quick experiments). They are NOT a substitute for DTD when
  reproducing paper numbers: set `texture_root` to a DTD copy for that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

TEXTURE_KINDS: tuple[str, ...] = ("fractal", "stripes", "checker", "cells", "blobs")
"""Names accepted by `generate_texture(kind=...)`."""


def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (same curve as the official `perlin.py`).
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise_2d(shape: Sequence[int], res: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Two-dimensional Perlin (gradient) noise.

    One random unit gradient per lattice corner, a lattice of `res[0] x res[1]` cells stretched over the
    image, dot products with the offsets to the four cell corners, quintic-fade interpolation, times
    sqrt(2) - the construction of DRAEM's / CRR's `rand_perlin_2d_np`. The official code needs `shape`
    divisible by `res`; here the noise is evaluated at `i * res / shape` directly, which is identical for
    divisible shapes and well defined otherwise.

    Args:
        shape: Output size `(H, W)`.
        res: Number of lattice cells along each axis `(ry, rx)`, each >= 1.
        rng: Source of the random gradient angles.

    Returns:
        float64 array of shape `(H, W)` with values roughly in [-1, 1].
    """
    h, w = int(shape[0]), int(shape[1])
    ry, rx = int(res[0]), int(res[1])
    if h <= 0 or w <= 0 or ry <= 0 or rx <= 0:
        raise ValueError(f"perlin_noise_2d needs positive shape and res, got shape={shape}, res={res}")
    angles = 2.0 * math.pi * rng.random((ry + 1, rx + 1))
    grad_y, grad_x = np.cos(angles), np.sin(angles)  # (ry+1, rx+1): the two components of each corner gradient

    ty = np.arange(h, dtype=np.float64) * (ry / h)
    tx = np.arange(w, dtype=np.float64) * (rx / w)
    iy = np.minimum(np.floor(ty).astype(np.int64), ry - 1)
    ix = np.minimum(np.floor(tx).astype(np.int64), rx - 1)
    fy = (ty - iy)[:, None]  # (H, 1) fractional position inside the cell
    fx = (tx - ix)[None, :]  # (1, W)

    def corner(dy: int, dx: int) -> np.ndarray:
        # Rows, then columns: two 1-D takes instead of one broadcast (H, W, 2) gather (4-5x faster, same values).
        rows, cols = iy + dy, ix + dx
        return grad_y[rows][:, cols] * (fy - dy) + grad_x[rows][:, cols] * (fx - dx)

    n00, n10, n01, n11 = corner(0, 0), corner(1, 0), corner(0, 1), corner(1, 1)
    uy, ux = _fade(fy), _fade(fx)
    # First axis of the lattice = rows, interpolated first (as the official lerp order).
    n0 = n00 + uy * (n10 - n00)
    n1 = n01 + uy * (n11 - n01)
    return math.sqrt(2.0) * (n0 + ux * (n1 - n0))


def fractal_noise_2d(
    shape: Sequence[int],
    res: Sequence[int],
    rng: np.random.Generator,
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """Sum of `octaves` Perlin layers with doubling frequency and `persistence`-decaying amplitude.

    Args:
        shape: Output size `(H, W)`.
        res: Lattice cells of the first octave.
        rng: Random source.
        octaves: Number of layers.
        persistence: Amplitude ratio between consecutive layers.

    Returns:
        float64 array `(H, W)`.
    """
    noise = np.zeros((int(shape[0]), int(shape[1])), dtype=np.float64)
    amplitude, freq = 1.0, 1
    for _ in range(octaves):
        noise += amplitude * perlin_noise_2d(shape, (res[0] * freq, res[1] * freq), rng)
        amplitude *= persistence
        freq *= 2
    return noise


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _colourise(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Map a scalar field in [0, 1] onto a random two- or three-colour gradient.
    n_colours = int(rng.integers(2, 4))
    palette = rng.uniform(0.0, 255.0, size=(n_colours, 3))
    # Piecewise-linear through the palette, one np.interp per channel (5x faster than an (H, W, 3) gather;
    # this runs for every second synthetic sample in every loader worker).
    knots, flat = np.arange(n_colours, dtype=np.float64), t.ravel() * (n_colours - 1)
    channels = [np.interp(flat, knots, palette[:, c]).astype(np.float32) for c in range(3)]
    return np.stack(channels, axis=-1).reshape(*t.shape, 3)


def generate_texture(shape: Sequence[int], rng: np.random.Generator, kind: str | None = None) -> np.ndarray:
    """Draw one procedural RGB texture.

    Kinds: `fractal` (multi-octave Perlin, marble/cloud-like), `stripes` (oriented sinusoid with
    Perlin warp), `checker` (rotated checkerboard), `cells` (Voronoi-like cells, crack/tile-like) and
    `blobs` (thresholded Perlin spots). All are colourised with a random palette and given light pixel
    noise so that they carry both low- and high-frequency content like DTD images.

    Args:
        shape: Output size `(H, W)`.
        rng: Random source; the texture is a deterministic function of its state.
        kind: One of `TEXTURE_KINDS`, or None to draw one uniformly.

    Returns:
        uint8 array `(H, W, 3)`.
    """
    h, w = int(shape[0]), int(shape[1])
    if kind is None:
        kind = TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
    if kind not in TEXTURE_KINDS:
        raise ValueError(f"unknown texture kind {kind!r}; expected one of {TEXTURE_KINDS}")
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)  # float32: every second synthetic sample draws a texture
    scale = float(max(h, w))

    if kind == "fractal":
        r = int(rng.integers(1, 5))
        field = fractal_noise_2d((h, w), (r, r), rng, octaves=int(rng.integers(3, 6)))
    elif kind == "stripes":
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.02, 0.15) * scale
        warp = perlin_noise_2d((h, w), (2, 2), rng) * rng.uniform(0.0, 0.5) * period
        coord = xx * math.cos(theta) + yy * math.sin(theta) + warp
        field = 0.5 + 0.5 * np.sin(2.0 * math.pi * coord / period)
    elif kind == "checker":
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(0.03, 0.2) * scale
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        field = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float64)
    elif kind == "cells":
        n_seeds = int(rng.integers(8, 64))
        seeds = (rng.uniform(0.0, 1.0, size=(n_seeds, 2)) * np.array([h, w])).astype(np.float32)
        # Distance to the nearest and second-nearest seed; their difference draws cell borders.
        # A running (min1, min2) pair keeps memory at O(H*W) instead of O(H*W*seeds).
        d1 = np.full((h, w), np.inf, dtype=np.float32)
        d2 = np.full((h, w), np.inf, dtype=np.float32)
        for sy, sx in seeds:
            d = np.hypot(yy - sy, xx - sx)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
        field = np.clip((d2 - d1) / (0.05 * scale), 0.0, 1.0)
        if n_seeds > 1 and rng.random() < 0.5:
            field = 1.0 - field
    else:  # blobs
        r = int(rng.integers(2, 9))
        noise = perlin_noise_2d((h, w), (r, r), rng)
        field = (noise > rng.uniform(-0.2, 0.3)).astype(np.float64)
        field = cv2.GaussianBlur(field, (0, 0), sigmaX=max(1.0, scale / 200.0))

    rgb = _colourise(_normalise(field), rng)
    rgb += rng.standard_normal(size=rgb.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 12.0))
    return np.clip(rgb, 0.0, 255.0).astype(np.uint8)
