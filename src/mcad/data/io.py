"""Image and mask decoding: every stored format becomes 8-bit RGB images and binary masks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset problem the user must fix (missing folder, unreadable file, size mismatch...)."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has an image extension (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scales integer images of any bit depth (16-bit PNGs, 32-bit TIFFs) to 0..255."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.floating):
        top = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        return np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    info = np.iinfo(array.dtype)
    # 16-bit data is usually stored in the full 0..65535 range; smaller values would look black,
    # so scale by the type's range (not the image's, which would change brightness per image).
    top = 65535 if array.max(initial=0) > 255 or array.dtype in (np.uint16, np.int32) else 255
    top = min(top, info.max)
    return np.clip(array.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _open(path: Path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()  # decode now so truncated files fail here, with the path in the message
        return img
    except FileNotFoundError as err:
        raise DataError(f"Image file not found: {path}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombWarning) as err:
        raise DataError(f"Cannot decode image file {path}: {err}") from err


def load_image(path: str | Path) -> np.ndarray:
    """Decodes an image as ``H×W×3`` uint8 RGB.

    Grayscale, palette, RGBA (alpha dropped), CMYK, 16-bit and float images all become RGB.

    Raises:
        DataError: The file is missing, corrupt or truncated.
    """
    path = Path(path)
    img = _open(path)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = _to_uint8(np.asarray(img))
        return np.repeat(array[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def load_mask(path: str | Path) -> np.ndarray:
    """Decodes a ground-truth mask as ``H×W`` uint8 in {0, 255} (any non-zero pixel is a defect)."""
    path = Path(path)
    img = _open(path)
    array = np.asarray(img)
    if array.ndim == 3:
        array = array[..., :3].max(axis=2) if array.shape[2] >= 3 else array[..., 0]
    return np.where(array > 0, 255, 0).astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """Reads ``(width, height)`` from the file header without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError as err:
        raise DataError(f"File not found: {path}") from err
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"Cannot read image header of {path}: {err}") from err
