"""The PASCAL VOC colour map and label PNGs that carry it.

Prediction and pseudo-mask PNGs are single-channel palette images (mode P): the pixel values are the class
indices (0 = background, c + 1 = class c, 255 = ignore, docs/algorithm.md §2.1), the palette only colours them, so
the files read back as label maps with `pipeline.data.images.load_mask` and show in colour in any viewer.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from weclip.pipeline.files import atomic_write


def voc_colormap(n: int = 256) -> np.ndarray:
    """n×3 uint8: the VOC devkit's `labelcolormap` (bits of the index spread over R, G, B from the top bit down).

    Index 0 is black, 1 (128, 0, 0), 15 (192, 128, 128) "person", 255 (224, 224, 192) the ignore colour.
    """
    index = np.arange(n)
    cmap = np.zeros((n, 3), dtype=np.int64)
    for bit in range(8):
        for channel in range(3):
            cmap[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return cmap.astype(np.uint8)


VOC_COLORMAP = voc_colormap()


def colorize(labels: np.ndarray) -> np.ndarray:
    """H×W class indices (0..255) → H×W×3 uint8 VOC colours."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"colorize needs an H×W map of indices in 0..255, got shape {labels.shape}")
    return VOC_COLORMAP[labels.astype(np.int64)]


def label_image(labels: np.ndarray) -> Image.Image:
    """H×W class indices → a mode-P PIL image with the VOC palette."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(f"a label PNG needs an H×W map of indices in 0..255, got shape {labels.shape}")
    data = np.ascontiguousarray(labels, dtype=np.uint8)
    image = Image.frombytes("P", (data.shape[1], data.shape[0]), data.tobytes())
    image.putpalette(VOC_COLORMAP.reshape(-1).tolist())
    return image


def save_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Write `labels` as a VOC-palette PNG, atomically (temp file in the same folder, then rename)."""
    return atomic_write(path, lambda tmp: label_image(labels).save(tmp, format="PNG"))
