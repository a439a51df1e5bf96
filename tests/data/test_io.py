import numpy as np
import pytest
from PIL import Image

from mcad.data.io import DataError, load_image, load_mask


def _save(tmp_path, name, array, mode=None):
    path = tmp_path / name
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    img.save(path)
    return path


def test_grayscale_rgba_palette_and_16bit_load_as_rgb(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgba = np.dstack([gray, gray // 2, gray // 4, np.full_like(gray, 128)])
    p_gray = _save(tmp_path, "g.png", gray)
    p_rgba = _save(tmp_path, "a.png", rgba)
    pal = Image.fromarray(gray).convert("P")
    pal.save(tmp_path / "p.png")
    sixteen = gray.astype(np.uint16) * 257  # full 16-bit range
    Image.fromarray(sixteen).save(tmp_path / "s.png")

    out_gray = load_image(p_gray)
    assert out_gray.shape == (8, 8, 3) and out_gray.dtype == np.uint8
    np.testing.assert_array_equal(out_gray[..., 0], gray)
    np.testing.assert_array_equal(out_gray[..., 2], gray)
    out_rgba = load_image(p_rgba)
    assert out_rgba.shape == (8, 8, 3)
    np.testing.assert_array_equal(out_rgba[..., 1], gray // 2)
    out_pal = load_image(tmp_path / "p.png")
    assert out_pal.shape == (8, 8, 3)
    np.testing.assert_allclose(out_pal[..., 0].astype(int), gray.astype(int), atol=8)
    out_16 = load_image(tmp_path / "s.png")
    assert out_16.shape == (8, 8, 3) and out_16.dtype == np.uint8
    np.testing.assert_array_equal(out_16[..., 0], gray)


def test_masks_are_binarised(tmp_path):
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1  # a {0, 1} mask (VisA style) counts as defect too
    mask[4, 4] = 255
    out = load_mask(_save(tmp_path, "m.png", mask))
    assert set(np.unique(out)) == {0, 255}
    assert (out > 0).sum() == 5


def test_truncated_and_missing_files_raise_clear_errors(tmp_path):
    path = _save(tmp_path, "x.png", np.full((32, 32, 3), 7, np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="x.png"):
        load_image(path)
    (tmp_path / "junk.png").write_text("not an image")
    with pytest.raises(DataError, match="junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
