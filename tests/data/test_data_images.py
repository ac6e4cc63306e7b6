"""Image and mask decoding: formats sniffed by content, every colour mode to RGB, broken files named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data import data_fakes as fk

from weclip.pipeline.data.images import ImageDecodeError, check_image, load_mask, load_rgb
from weclip.pipeline.errors import DataError


def test_png_named_jpg_is_sniffed_and_lossless(tmp_path):
    arr = fk.rgb(9, 13, seed=3)
    path = fk.write_image(tmp_path / "x.jpg", arr, fmt="PNG")
    assert np.array_equal(load_rgb(path), arr)
    assert check_image(path) == (9, 13)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1"])
def test_colour_modes_become_rgb_like_pil(tmp_path, mode):
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    path = fk.write_image(tmp_path / f"x_{mode}.img", fk.rgb(10, 12, seed=1), fmt=fmt, mode=mode)
    with Image.open(path) as im:
        assert im.mode == mode
        expected = np.asarray(im.convert("RGB"))
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (10, 12, 3)
    assert np.array_equal(out, expected)
    if mode in ("L", "LA", "1"):
        assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_rgba_drops_alpha_keeps_colour(tmp_path):
    arr = np.dstack([fk.rgb(6, 7, seed=2), np.full((6, 7), 17, np.uint8)])
    path = fk.write_image(tmp_path / "a.png", arr, fmt="PNG")
    assert np.array_equal(load_rgb(path), arr[..., :3])


def test_16bit_gray_is_scaled_not_clipped(tmp_path):
    gray = (np.arange(30, dtype=np.uint16).reshape(5, 6) * 2000)
    path = tmp_path / "g16.png"
    Image.fromarray(gray).save(path)
    out = load_rgb(path)
    assert np.array_equal(out[..., 0], (gray // 256).astype(np.uint8))


def test_missing_empty_corrupt_are_named(tmp_path):
    with pytest.raises(ImageDecodeError) as err:
        load_rgb(tmp_path / "nope.jpg")
    assert err.value.reason == "missing" and "nope.jpg" in str(err.value)
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError) as err:
        check_image(tmp_path / "zero.jpg")
    assert err.value.reason == "empty"
    (tmp_path / "text.jpg").write_text("not an image at all")
    with pytest.raises(ImageDecodeError) as err:
        check_image(tmp_path / "text.jpg")
    assert err.value.reason == "corrupt"


def test_truncated_jpeg_caught_by_full_decode_only(tmp_path):
    path = fk.write_image(tmp_path / "t.jpg", fk.rgb(64, 64, seed=5))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert check_image(path, decode="header") == (64, 64)  # header and verify() cannot see it
    with pytest.raises(ImageDecodeError) as err:
        check_image(path, decode="full")
    assert err.value.reason == "corrupt" and "t.jpg" in str(err.value)


def test_unsupported_mode_is_reported(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(path)
    for decode in ("full", "header"):
        with pytest.raises(ImageDecodeError) as err:
            check_image(path, decode=decode)
        assert err.value.reason == "unsupported_mode"


@pytest.mark.parametrize("palette", [True, False])
def test_mask_returns_indices_not_colours(tmp_path, palette):
    mask = fk.mask_with(8, 16, [3, 20, 7])
    path = fk.write_mask(tmp_path / "m.png", mask, palette=palette)
    out = load_mask(path)
    assert out.dtype == np.uint8 and np.array_equal(out, mask)


def test_rgb_mask_is_rejected(tmp_path):
    path = fk.write_image(tmp_path / "m.png", fk.rgb(4, 4), fmt="PNG")
    with pytest.raises(ImageDecodeError) as err:
        load_mask(path)
    assert err.value.reason == "unsupported_mode" and "'RGB'" in str(err.value)


@pytest.mark.parametrize("loop", [{"a.jpg": "a.jpg"}, {"a.jpg": "b.jpg", "b.jpg": "a.jpg"}])
def test_symlink_loop_is_a_missing_file_not_a_crash(tmp_path, loop):
    for name, target in loop.items():
        (tmp_path / name).symlink_to(target)
    for check in (check_image, lambda p: check_image(p, decode="header"), load_rgb, load_mask):
        with pytest.raises(ImageDecodeError) as err:
            check(tmp_path / "a.jpg")
        assert err.value.reason == "missing" and "a.jpg" in str(err.value)
        assert "symbolic links" in str(err.value)


def test_decode_errors_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: file does not exist"):
        load_rgb(tmp_path / "nope.jpg")
