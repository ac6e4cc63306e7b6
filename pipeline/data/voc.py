"""PASCAL VOC 2012 layout reader (also the embedded shapes world, which uses the same layout).

    <root>/JPEGImages/<id>.jpg
    <root>/SegmentationClassAug/<id>.png  (or SegmentationClass/; index PNG, 0 = bg, k = class k-1, 255 = ignore)
    <root>/Annotations/<id>.xml
    <root>/ImageSets/Segmentation/<split>.txt  (or ImageSets/SegmentationAug/, or <root>/<split>.txt, or any list file)

Labels (docs/algorithm.md §2.1): `labels_from="mask"` (default, WeCLIP's released code) takes the unique
values of the whole-image GT PNG; `labels_from="xml"` (CLIP-ES) takes every `<object><name>`.
Either way the manifest stores them unique and ascending (CLIP-ES keeps XML order; order does not
change a CAM).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from weclip.pipeline.data.manifest import Candidate, Listing, Reject, read_id_list
from weclip.pipeline.data.textfile import MissingFileError
from weclip.pipeline.errors import DataError

IMAGE_DIR = "JPEGImages"
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")  # first existing one wins
XML_DIR = "Annotations"
SPLIT_DIRS = ("ImageSets/Segmentation", "ImageSets/SegmentationAug", ".")
LABEL_SOURCES = ("mask", "xml")  # the first is the default
_IMAGE_EXTS = (".jpg", ".jpeg", ".png")


def split_list_path(root: Path, split: str, list_file: str | Path | None = None) -> Path:
    """The list file for a split: `list_file` if given (absolute or relative to root), else the first
    of `ImageSets/Segmentation/<split>.txt`, `ImageSets/SegmentationAug/<split>.txt`, `<root>/<split>.txt`."""
    if list_file is not None:
        path = Path(list_file)
        return path if path.is_absolute() else root / path
    tried = [root / d / f"{split}.txt" for d in SPLIT_DIRS]
    for path in tried:
        if path.is_file():
            return path
    raise MissingFileError(f"no list file for split {split!r}; looked for {[str(p) for p in tried]}; "
                           f"pass list_file= (e.g. WeCLIP's datasets/voc/train_aug.txt)")


def image_names(image_dir: Path) -> dict[str, str]:
    """id -> file name for the images in a folder (one directory scan instead of a stat per id)."""
    if not image_dir.is_dir():
        raise MissingFileError(f"image folder {image_dir} does not exist")
    names: dict[str, str] = {}
    for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
        stem, ext = os.path.splitext(entry.name)
        if ext.lower() in _IMAGE_EXTS and stem not in names:
            names[stem] = entry.name
    return names


def xml_class_names(path: Path) -> list[str]:
    """`<object><name>` of a VOC annotation, in file order (parts such as `<part><name>head` are skipped)."""
    tree = ET.parse(path)
    return [(obj.findtext("name") or "").strip() for obj in tree.getroot().findall("object")]


def _xml_labels(root: Path, image_id: str, index: dict[str, int]) -> tuple[int, ...] | Reject:
    rel = f"{XML_DIR}/{image_id}.xml"
    try:
        names = xml_class_names(root / rel)
    except FileNotFoundError:
        return Reject(image_id, rel, "annotation_missing", f"{root / rel} does not exist")
    except OSError as err:  # a symlink loop, a folder, no permission: this image has no readable label source
        return Reject(image_id, rel, "annotation_missing", f"{root / rel} cannot be read ({err.strerror})")
    except ET.ParseError as err:
        return Reject(image_id, rel, "annotation_corrupt", f"{root / rel}: {err}")
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        return Reject(image_id, rel, "unknown_class", f"object names {unknown} are not in the class list")
    return tuple(index[n] for n in names)


def read_voc(root: str | Path, split: str, class_names: Sequence[str], *, list_file: str | Path | None = None,
             labels_from: Literal["mask", "xml"] = "mask") -> Listing:
    """List the images of one split as manifest candidates (validated later by `manifest.validate`)."""
    if labels_from not in LABEL_SOURCES:
        raise DataError(f"VOC labels_from must be one of {LABEL_SOURCES}, got {labels_from!r}")
    root = Path(root)
    ids = read_id_list(split_list_path(root, split, list_file))
    images = image_names(root / IMAGE_DIR)
    mask_dir = next((d for d in MASK_DIRS if (root / d).is_dir()), None)
    if labels_from == "mask" and mask_dir is None:
        raise MissingFileError(f"labels_from='mask' needs {' or '.join(MASK_DIRS)} under {root}; "
                               f"use labels_from='xml' to read {XML_DIR}/ instead")
    index = {name: i for i, name in enumerate(class_names)}
    listing = Listing()
    for image_id in ids:
        image_path = f"{IMAGE_DIR}/{images.get(image_id, image_id + '.jpg')}"
        mask_path = None if mask_dir is None else f"{mask_dir}/{image_id}.png"
        if labels_from == "mask":
            listing.candidates.append(Candidate(image_id, image_path, split, mask_path))
            continue
        labels = _xml_labels(root, image_id, index)
        if isinstance(labels, Reject):
            listing.rejects.append(labels)
            continue
        if mask_path is not None and not (root / mask_path).is_file():
            mask_path = None  # train_aug ids outside VOC's 2,913 have no SegmentationClass PNG: no GT, still trainable
        listing.candidates.append(Candidate(image_id, image_path, split, mask_path, labels))
    return listing
