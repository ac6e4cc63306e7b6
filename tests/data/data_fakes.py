"""Tiny on-disk dataset trees in the real layouts (VOC, COCO, folder), built from generated pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VOC_PALETTE = [v for i in range(256) for v in (i * 37 % 256, i * 91 % 256, i * 13 % 256)]


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path: Path, array: np.ndarray, fmt: str = "JPEG", mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    if mode is not None:
        im = im.convert(mode)
    im.save(path, format=fmt)
    return path


def write_mask(path: Path, mask: np.ndarray, palette: bool = True) -> Path:
    """An index PNG: mode P with a palette (VOC SegmentationClass) or mode L (SegmentationClassAug)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    im = Image.frombytes("P" if palette else "L", (mask.shape[1], mask.shape[0]), mask.tobytes())
    if palette:
        im.putpalette(VOC_PALETTE)
    im.save(path, format="PNG")
    return path


def mask_with(h: int, w: int, values: list[int], border: bool = True) -> np.ndarray:
    """A mask with one vertical stripe per value (0 elsewhere) and a 255 border ring, like VOC's."""
    mask = np.zeros((h, w), dtype=np.uint8)
    for i, v in enumerate(values):
        mask[2:h - 2, 2 + 3 * i: 4 + 3 * i] = v
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 255
    return mask


def write_xml(path: Path, names: list[str], h: int, w: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    objects = "".join(f"<object><name>{n}</name><pose>Left</pose>"
                      f"<part><name>head</name></part><bndbox><xmin>1</xmin></bndbox></object>" for n in names)
    path.write_text(f"<annotation><filename>x.jpg</filename><size><width>{w}</width><height>{h}</height>"
                    f"<depth>3</depth></size>{objects}</annotation>")
    return path


def make_voc(root: Path, items: dict[str, tuple[list[int], list[str]]], split: str = "train",
             mask_dir: str = "SegmentationClassAug", size: tuple[int, int] = (24, 32)) -> Path:
    """VOC tree: for each id, a JPEG, a mask holding the given pixel values and an XML with the given names."""
    h, w = size
    for n, (image_id, (values, names)) in enumerate(items.items()):
        write_image(root / "JPEGImages" / f"{image_id}.jpg", rgb(h, w, n))
        write_mask(root / mask_dir / f"{image_id}.png", mask_with(h, w, values), palette=mask_dir == "SegmentationClass")
        write_xml(root / "Annotations" / f"{image_id}.xml", names, h, w)
    list_dir = root / "ImageSets" / "Segmentation"
    list_dir.mkdir(parents=True, exist_ok=True)
    (list_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    return root


# A few real COCO categories with their real ids and official names (ids have gaps; names differ from ours).
COCO_CATEGORIES = [{"id": 1, "name": "person"}, {"id": 4, "name": "motorcycle"}, {"id": 5, "name": "airplane"},
                   {"id": 63, "name": "couch"}, {"id": 64, "name": "potted plant"}, {"id": 67, "name": "dining table"},
                   {"id": 72, "name": "tv"}, {"id": 90, "name": "toothbrush"}]


def make_coco(root: Path, split: str, images: dict[int, list[int]], layout: str = "weclip",
              masks: dict[int, list[int]] | None = None, size: tuple[int, int] = (20, 28)) -> Path:
    """COCO tree: images (numeric id -> category ids of its annotations), the instances json and, when
    `masks` is given, VOC-style PNG masks holding those pixel values."""
    h, w = size
    img_dir = root / ("JPEGImages/" + split if layout == "weclip" else f"{split}2014")
    entries, anns = [], []
    for n, (num, cats) in enumerate(images.items()):
        name = f"COCO_{split}2014_{num:012d}.jpg"
        write_image(img_dir / name, rgb(h, w, n))
        entries.append({"id": num, "file_name": name, "height": h, "width": w})
        anns += [{"id": len(anns) + 1, "image_id": num, "category_id": c, "iscrowd": 0} for c in cats]
    for num, values in (masks or {}).items():
        write_mask(root / "SegmentationClass" / split / f"{num:012d}.png", mask_with(h, w, values), palette=False)
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    (ann_dir / f"instances_{split}2014.json").write_text(
        json.dumps({"images": entries, "annotations": anns, "categories": COCO_CATEGORIES[::-1]}))
    return root
