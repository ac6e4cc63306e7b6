"""A folder of images with image-level labels in a CSV or JSON file.

CSV: a header with `image` and `labels` columns (optional `mask`); `labels` holds class names or
0-based class ids, separated by semicolons, or by whitespace when there is no semicolon (so names
containing a space, like COCO's "traffic light", need semicolons). JSON: either `{"a.jpg": [...]}`
or `[{"image": "a.jpg", "labels": [...] or "...", "mask": optional}, ...]`. Image and mask paths are
relative to the root. The image id is the image path without its suffix.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from weclip.pipeline.data.manifest import Candidate, Listing, Reject, strip_image_suffix
from weclip.pipeline.data.textfile import read_text
from weclip.pipeline.errors import DataError


def _class_lines(path: str | Path) -> list[tuple[str, str | None]]:
    """(name, prompt or None) per class line of a class file: `name`, or `name: prompt text` to prompt the CAMs with
    other words (synonyms, e.g. `person: person with clothes,people,human`); blank and '#' lines are skipped."""
    entries = []
    for line in read_text(path, "class-name file").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, prompt = line.partition(":")
        entries.append((name.strip(), prompt.strip() if sep and prompt.strip() else None))
    if not entries:
        raise DataError(f"class-name file {path} lists no classes; write one class name per line")
    names = [n for n, _ in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"class-name file {path} lists a class twice ({twice}); keep one line per class")
    return entries


def load_class_names(path: str | Path) -> tuple[str, ...]:
    """Class names from a class file, one per line (index = class id)."""
    return tuple(name for name, _ in _class_lines(path))


def load_class_prompts(path: str | Path) -> tuple[str, ...] | None:
    """The prompt of every class of a class file (its name where the line gives none); None when no line gives one."""
    entries = _class_lines(path)
    if all(prompt is None for _, prompt in entries):
        return None
    return tuple(prompt or name for name, prompt in entries)


def _relative(root: Path, name: str) -> str:
    """A path from the label file (relative to root, or absolute) as a POSIX path relative to root."""
    return Path(os.path.relpath(root / name, root)).as_posix()


def _tokens(labels: str | Sequence[str | int]) -> list[str | int]:
    if isinstance(labels, str):
        return [t.strip() for t in (labels.split(";") if ";" in labels else labels.split()) if t.strip()]
    return list(labels)


def parse_labels(labels: str | Sequence[str | int], index: dict[str, int]) -> tuple[tuple[int, ...], list[str]]:
    """Tokens -> (class ids, unknown names). Integer tokens are 0-based ids (range-checked at validation)."""
    ids: list[int] = []
    unknown: list[str] = []
    for tok in _tokens(labels):
        if isinstance(tok, int) or tok.lstrip("-").isdigit():
            ids.append(int(tok))
        elif tok in index:
            ids.append(index[tok])
        else:
            unknown.append(tok)
    return tuple(ids), unknown


def _csv_records(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path, "label file"), newline=""))
    missing = {"image", "labels"} - set(reader.fieldnames or ())
    if missing:
        raise DataError(f"label file {path} lacks the column(s) {sorted(missing)}; "
                        f"expected a header like 'image,labels'")
    return [dict(r) for r in reader]


def _json_records(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path, "label file"))
    except json.JSONDecodeError as err:
        raise DataError(f"label file {path} is not valid JSON ({err})") from None
    return [{"image": k, "labels": v} for k, v in data.items()] if isinstance(data, dict) else list(data)


def _records(path: Path) -> list[dict]:
    """The label file as a list of {'image', 'labels', 'mask'?} dicts."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_records(path)
    if suffix == ".json":
        return _json_records(path)
    raise DataError(f"label file {path} must be .csv or .json")


def read_folder(root: str | Path, labels_file: str | Path, class_names: Sequence[str], *,
                split: str = "train") -> Listing:
    """List the images named in `labels_file` (absolute or relative to root) as manifest candidates."""
    root = Path(root)
    path = Path(labels_file)
    path = path if path.is_absolute() else root / path
    index = {name: i for i, name in enumerate(class_names)}
    listing = Listing()
    for n, rec in enumerate(_records(path)):
        if not isinstance(rec, dict) or not rec.get("image"):
            raise DataError(f"label file {path}, record {n + 1}: needs an 'image' entry, got {rec!r}")
        image_path = _relative(root, rec["image"])
        image_id = str(PurePosixPath(image_path).with_name(strip_image_suffix(PurePosixPath(image_path).name)))
        labels, unknown = parse_labels(rec.get("labels") or "", index)
        if unknown:
            listing.rejects.append(Reject(image_id, image_path, "unknown_class",
                                          f"{path}: class names {unknown} are not in the class list"))
            continue
        mask = _relative(root, rec["mask"]) if rec.get("mask") else None
        listing.candidates.append(Candidate(image_id, image_path, split, mask, labels))
    return listing
