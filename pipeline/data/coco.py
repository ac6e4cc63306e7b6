"""MS COCO 2014 reader: image-level labels from `instances_<split>2014.json` or from VOC-style PNG masks.

Layouts (docs/algorithm.md §2.2), the first existing image folder wins:
    WeCLIP:   <root>/JPEGImages/<split>/COCO_<split>2014_<12 digits>.jpg
    official: <root>/<split>2014/COCO_<split>2014_<12 digits>.jpg
    masks:    <root>/SegmentationClass/<split>/<12 digits>.png   (0 = bg, k = class k-1, 255 = ignore)
    json:     <root>/annotations/instances_<split>2014.json (or <root>/instances_<split>2014.json)

`labels_from="mask"` (default, WeCLIP's released code) uses the unique mask values; `"json"` uses the
categories of every annotation of the image (crowd annotations included: the object is there).
COCO category ids (1..90 with gaps) are mapped to our 0..79 order by name; COCO's official names are
translated to the VOC-style spellings of `pipeline.model.text.COCO_CLASSES`.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from weclip.pipeline.data.manifest import Candidate, Listing, Reject, read_id_list
from weclip.pipeline.data.textfile import MissingFileError, read_text
from weclip.pipeline.data.voc import image_names
from weclip.pipeline.errors import DataError

# official COCO name -> the spelling used in pipeline/model/text.py (VOC style, as the released code's lists)
COCO_NAME_ALIASES = {"motorcycle": "motorbike", "airplane": "aeroplane", "couch": "sofa",
                     "potted plant": "pottedplant", "dining table": "diningtable", "tv": "tvmonitor"}
_COCO_ID = re.compile(r"COCO_[a-z]+2014_(\d{12})")
LABEL_SOURCES = ("mask", "json")  # the first is the default


def image_dir(root: Path, split: str) -> str:
    """Relative image folder of a split, WeCLIP layout first, then the official one."""
    for rel in (f"JPEGImages/{split}", f"{split}2014"):
        if (root / rel).is_dir():
            return rel
    raise MissingFileError(f"no COCO images for split {split!r} under {root}: "
                           f"expected JPEGImages/{split}/ or {split}2014/")


def annotation_path(root: Path, split: str, annotations: str | Path | None = None) -> Path | None:
    """The instances json: `annotations` if given (absolute or relative to root), else the usual places."""
    if annotations is not None:
        path = Path(annotations)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise MissingFileError(f"COCO annotation file {path} does not exist")
        return path
    name = f"instances_{split}2014.json"
    return next((p for p in (root / "annotations" / name, root / name) if p.is_file()), None)


def mask_name(image_id: str) -> str:
    """'COCO_train2014_000000000009' -> '000000000009.png' (WeCLIP strips the prefix); other ids keep their name."""
    match = _COCO_ID.fullmatch(image_id)
    return f"{match.group(1) if match else image_id}.png"


def category_map(categories: list[dict], class_names: Sequence[str], source: Path) -> dict[int, int]:
    """COCO category id -> 0-based class id, matched by (alias-translated) name."""
    index = {name: i for i, name in enumerate(class_names)}
    mapping: dict[int, int] = {}
    for cat in categories:
        name = COCO_NAME_ALIASES.get(cat["name"], cat["name"])
        if name not in index:
            raise DataError(f"{source}: category {cat['name']!r} (id {cat['id']}) is not one of the "
                            f"{len(class_names)} classes of the class list; use the matching class set")
        mapping[int(cat["id"])] = index[name]
    return mapping


def json_labels(path: Path, class_names: Sequence[str]) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Parse an instances json: (image id (file stem) -> class ids, image ids in file order)."""
    try:
        data = json.loads(read_text(path, "COCO annotation file"))
        images = {int(im["id"]): im["file_name"] for im in data["images"]}
        cats = category_map(data["categories"], class_names, path)
        labels: dict[int, set[int]] = {i: set() for i in images}
        for ann in data["annotations"]:
            labels[int(ann["image_id"])].add(cats[int(ann["category_id"])])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a COCO instances file ({type(err).__name__}: {err})") from None
    stems = {i: Path(name).stem for i, name in images.items()}
    return {stems[i]: tuple(sorted(labels[i])) for i in images}, list(stems.values())


def folder_ids(folder: Path, images: dict[str, str]) -> list[str]:
    """The ids of a split listed from its image folder, sorted.

    A file name that is not UTF-8 cannot be stored in the manifest (Parquet strings are UTF-8), so it is refused
    by name here instead of crashing the write after every image was validated."""
    bad = sorted(os.fsencode(name) for name in images.values() if not _is_utf8(name))
    if bad:
        raise DataError(f"image folder {folder}: file name {bad[0]!r} is not UTF-8 ({len(bad)} such names); "
                        f"rename the files, or pass list_file= with the ids to use")
    return sorted(images)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # os.scandir turns undecodable bytes into lone surrogates
        return False
    return True


def read_coco(root: str | Path, split: str, class_names: Sequence[str], *,
              labels_from: Literal["mask", "json"] = "mask", annotations: str | Path | None = None,
              list_file: str | Path | None = None) -> Listing:
    """List one split as manifest candidates. The ids come from `list_file` if given, else from the
    json (if any), else from the image folder."""
    if labels_from not in LABEL_SOURCES:
        raise DataError(f"COCO labels_from must be one of {LABEL_SOURCES}, got {labels_from!r}")
    root = Path(root)
    img_dir = image_dir(root, split)
    images = image_names(root / img_dir)
    mask_dir = f"SegmentationClass/{split}"
    has_masks = (root / mask_dir).is_dir()
    if labels_from == "mask" and not has_masks:
        raise MissingFileError(f"labels_from='mask' needs {root / mask_dir}; use labels_from='json' with "
                               f"annotations/instances_{split}2014.json instead")
    json_path = annotation_path(root, split, annotations)
    if labels_from == "json" and json_path is None:
        raise MissingFileError(f"labels_from='json' needs annotations/instances_{split}2014.json under {root} "
                               f"(or pass annotations=)")
    by_id, json_ids = json_labels(json_path, class_names) if json_path is not None else ({}, [])
    if list_file is not None:
        path = Path(list_file)
        ids = read_id_list(path if path.is_absolute() else root / path)
    else:
        ids = json_ids or folder_ids(root / img_dir, images)
    listing = Listing()
    for image_id in ids:
        image_path = f"{img_dir}/{images.get(image_id, image_id + '.jpg')}"
        mask_path = f"{mask_dir}/{mask_name(image_id)}" if has_masks else None
        if labels_from == "mask":
            listing.candidates.append(Candidate(image_id, image_path, split, mask_path))
        elif image_id not in by_id:
            listing.rejects.append(Reject(image_id, str(json_path), "annotation_missing",
                                          f"{json_path} has no image with file name {image_id}.*"))
        else:
            if mask_path is not None and not (root / mask_path).is_file():
                mask_path = None
            listing.candidates.append(Candidate(image_id, image_path, split, mask_path, by_id[image_id]))
    return listing
