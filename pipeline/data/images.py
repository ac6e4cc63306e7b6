"""Robust image and mask decoding: every file becomes 8-bit RGB (images) or an 8-bit index map (masks).

PIL identifies the format from the file's content, not its name, so a PNG saved as `.jpg` decodes
correctly. Colour modes are converted to RGB the way WeCLIP's loaders end up (docs/algorithm.md §2.2:
grayscale is replicated to three channels); alpha is dropped; 16-bit grayscale is scaled to 8 bits
instead of being clipped (PIL's own conversion saturates every value above 255). EXIF orientation
is deliberately NOT applied: the ground-truth masks are aligned with the stored pixel grid.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from weclip.pipeline import storage
from weclip.pipeline.errors import DataError
from weclip.pipeline.files import is_url

# Modes PIL converts to RGB without losing meaning. The 16-bit grayscale modes are scaled first.
_RGB_CONVERTIBLE = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV",
                              "L", "LA", "La", "P", "PA", "1"})
_GRAY16 = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_MASK_MODES = frozenset({"P", "L"})  # VOC SegmentationClass is P, SegmentationClassAug is L

DecodeMode = Literal["full", "header"]


class ImageDecodeError(DataError):
    """A file that cannot be used. `reason` is a short code used in reject files: missing, empty,
    corrupt, unsupported_mode, size_mismatch."""

    def __init__(self, path: str | Path, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason


def _open(path: str | Path) -> Image.Image:
    """Open a file or an fsspec URL lazily (header only), turning every failure into an ImageDecodeError.

    A path that does not resolve to a file (absent, a symlink loop, a dangling link, a component that is not a
    folder) is `missing`, as `os.path.exists` sees it: one such file must not stop a whole manifest build. An object
    at a URL is read whole (object stores have no seek); a storage failure other than "no such object" is a
    StorageError, since it concerns the store, not the image."""
    if is_url(path):
        try:
            data = storage.read_bytes(str(path))
        except FileNotFoundError:
            raise ImageDecodeError(path, "missing", "object does not exist") from None
        size, source = len(data), io.BytesIO(data)
    else:
        source = path = Path(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(path, "missing", "file does not exist") from None
        except OSError as err:
            raise ImageDecodeError(path, "missing", f"path does not lead to a file ({err.strerror})") from None
    if size == 0:
        raise ImageDecodeError(path, "empty", "file has zero bytes")
    try:
        return Image.open(source)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(path, "corrupt", f"not a readable image ({err})") from None


def _decode(path: str | Path, allowed: frozenset[str]) -> Image.Image:
    """Fully decode the pixel data (catches truncated files, which a header read does not)."""
    im = _open(path)
    if im.mode not in allowed:
        im.close()
        raise ImageDecodeError(path, "unsupported_mode", f"pixel mode {im.mode!r} is not supported")
    try:
        im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        im.close()
        raise ImageDecodeError(path, "corrupt", f"pixel data cannot be decoded ({err})") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any supported PIL mode to RGB; 16-bit grayscale keeps its top 8 bits."""
    if im.mode in _GRAY16:
        gray = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file (or fsspec URL) to an H×W×3 uint8 array (RGB). Raises ImageDecodeError naming it."""
    with _decode(path, _RGB_CONVERTIBLE | _GRAY16) as im:
        return np.array(to_rgb(im), dtype=np.uint8)


def load_manifest_rgb(path: str | Path, height: int, width: int) -> np.ndarray:
    """`load_rgb` of an image a manifest recorded as height × width. A file that changed size since the manifest
    was built raises ImageDecodeError with reason `size_mismatch` (its message says to rebuild the manifest)."""
    return _manifest_sized(path, load_rgb(path), height, width)


def load_manifest_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    """`load_mask` of the mask of an image a manifest recorded as height × width (`size_mismatch` as above)."""
    return _manifest_sized(path, load_mask(path), height, width)


def _manifest_sized(path: str | Path, pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    if pixels.shape[:2] != (height, width):
        raise ImageDecodeError(path, "size_mismatch", f"{pixels.shape[0]}x{pixels.shape[1]} (HxW), the "
                               f"manifest says {height}x{width}; rebuild the manifest")
    return pixels


def load_mask(path: str | Path) -> np.ndarray:
    """Decode a single-channel index PNG (mode P or L) to an H×W uint8 array of class indices.

    For palette images the values are the palette indices, i.e. the VOC class ids (0 = background,
    255 = ignore), never the palette colours.
    """
    with _decode(path, _MASK_MODES) as im:
        return np.array(im, dtype=np.uint8)


def check_image(path: str | Path, decode: DecodeMode = "full") -> tuple[int, int]:
    """Return (height, width) of a usable image, or raise ImageDecodeError.

    `decode="full"` decodes every pixel (a truncated JPEG is caught); `"header"` only reads the
    header and runs PIL's `verify()` (checksums for PNG; much faster on large sets, but a truncated
    JPEG passes).
    """
    if decode == "full":
        with _decode(path, _RGB_CONVERTIBLE | _GRAY16) as im:
            return im.height, im.width
    with _open(path) as im:
        if im.mode not in _RGB_CONVERTIBLE | _GRAY16:
            raise ImageDecodeError(path, "unsupported_mode", f"pixel mode {im.mode!r} is not supported")
        height, width = im.height, im.width
        try:
            im.verify()
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageDecodeError(path, "corrupt", f"image fails verification ({err})") from None
    return height, width
