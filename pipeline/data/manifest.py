"""The dataset manifest (docs/design.md §3.1): candidate rows from a reader, validation, Parquet I/O, rejects.

A reader (voc.py, coco.py, folder.py) lists `Candidate`s and the rejects it can already decide
(unknown class names, missing XML). `validate` then checks every candidate on disk in a thread pool
(PIL decodes outside the GIL) and turns it into a `ManifestRow` or a `Reject`; nothing is dropped
without a reason. The Arrow schema is built from `manifests/manifest_schema.json`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from weclip.pipeline.files import absolute_location, atomic_write, is_url, join_location
from weclip.pipeline.config import IGNORE_INDEX
from weclip.pipeline.data.images import DecodeMode, ImageDecodeError, check_image, load_mask
from weclip.pipeline.data.textfile import MissingFileError, read_text
from weclip.pipeline.errors import DataError, StorageError
from weclip.pipeline import storage

_ARROW_TYPES = {"string": pa.string(), "int16": pa.int16(), "int32": pa.int32(),
                "list<int16>": pa.list_(pa.int16())}
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@cache
def schema_spec() -> dict:
    """The manifest contract as data (manifests/manifest_schema.json)."""
    return json.loads(resources.files("weclip.manifests").joinpath("manifest_schema.json").read_text())


@cache
def arrow_schema() -> pa.Schema:
    spec = schema_spec()
    return pa.schema([pa.field(c["name"], _ARROW_TYPES[c["type"]], nullable=c["nullable"])
                      for c in spec["columns"]])


def schema_version() -> int:
    return int(schema_spec()["schema_version"])


@dataclass(frozen=True)
class Candidate:
    """A row before validation. `labels=None` means: derive the labels from the mask (WeCLIP's rule)."""
    image_id: str
    image_path: str  # POSIX, relative to the dataset root
    split: str
    mask_path: str | None = None
    labels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.labels is None and self.mask_path is None:
            raise DataError(f"candidate {self.image_id!r} has neither labels nor a mask to derive them from")


@dataclass(frozen=True)
class Reject:
    image_id: str
    path: str  # the offending file, relative to the root (absolute when outside it)
    reason: str  # a code listed in manifest_schema.json "rejects.reasons"
    detail: str = ""


@dataclass(frozen=True)
class ManifestRow:
    image_id: str
    image_path: str
    mask_path: str | None
    labels: tuple[int, ...]
    height: int
    width: int
    split: str


@dataclass
class Listing:
    """What a reader returns: candidates to validate plus the rejects it found itself."""
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def has_image_suffix(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in _IMAGE_SUFFIXES


def strip_image_suffix(name: str) -> str:
    """'JPEGImages/2007_000032.jpg' -> '2007_000032'; an id without an image suffix is kept as is."""
    path = PurePosixPath(name)
    return path.stem if has_image_suffix(name) else path.name


def list_line_id(path: Path, number: int, line: str) -> str:
    """The id of one split-list line (see `read_id_list`).

    A line whose later tokens are neither a DeepLab pair (first token a file name) nor CLIP-ES class ids is an id
    with whitespace (`my image`); it is refused here, naming the line, rather than later as a missing `my.jpg`."""
    first, *rest = line.split()
    if rest and not has_image_suffix(first) and not all(t.isdigit() for t in rest):
        raise DataError(f"split list {path}, line {number}: id {line.strip()!r} contains whitespace; "
                        f"rename the image without spaces (or list it in a folder-format labels CSV)")
    return strip_image_suffix(first)


def read_id_list(path: Path) -> list[str]:
    """Ids from a split list file: the first token of each non-empty, non-comment line.

    Accepts plain ids (`ImageSets/Segmentation/train.txt`), DeepLab-style pairs
    (`/JPEGImages/x.jpg /SegmentationClassAug/x.png`) and CLIP-ES's `coco14/*.txt` (id then class ids).
    """
    lines = read_text(path, "split list").splitlines()
    ids = [list_line_id(Path(path), n, line) for n, line in enumerate(lines, 1)
           if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise DataError(f"split list {path} contains no ids; list one image id per line")
    return ids


def mask_labels(mask: np.ndarray) -> tuple[int, ...]:
    """0-based foreground ids present in an index mask: sorted unique values minus 1, without 0 and 255.

    Equivalent to WeCLIP's uint8 trick (docs/algorithm.md §2.1: `unique - 1`, drop 255 and 254), which
    removes exactly the background (0) and ignore (255) values.
    """
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))  # sorted unique, without a sort
    return tuple(int(v) - 1 for v in values if v != 0 and v != IGNORE_INDEX)


def _validate_one(c: Candidate, root: Path, num_classes: int, decode: DecodeMode) -> ManifestRow | Reject:
    try:
        height, width = check_image(root / c.image_path, decode)
    except ImageDecodeError as err:
        return Reject(c.image_id, c.image_path, f"image_{err.reason}", str(err))
    labels = c.labels
    if c.mask_path is not None:
        try:
            mask = load_mask(root / c.mask_path)
        except ImageDecodeError as err:
            return Reject(c.image_id, c.mask_path, f"mask_{err.reason}", str(err))
        if mask.shape != (height, width):
            return Reject(c.image_id, c.mask_path, "mask_size_mismatch",
                          f"mask is {mask.shape[0]}x{mask.shape[1]}, image is {height}x{width} (HxW)")
        from_mask = mask_labels(mask)
        bad = [v + 1 for v in from_mask if v >= num_classes]
        if bad:
            return Reject(c.image_id, c.mask_path, "label_out_of_range",
                          f"mask values {bad} exceed the {num_classes} classes (allowed 0..{num_classes}, 255)")
        labels = from_mask if labels is None else labels
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        return Reject(c.image_id, c.image_path, "label_out_of_range",
                      f"class ids {bad} outside 0..{num_classes - 1}")
    if not labels:
        return Reject(c.image_id, c.image_path, "no_foreground", "image has no foreground class")
    return ManifestRow(c.image_id, c.image_path, c.mask_path, tuple(sorted(set(labels))), height, width, c.split)


def validate(candidates: Sequence[Candidate], root: Path, num_classes: int, *, decode: DecodeMode = "full",
             workers: int = 8, progress: bool = True) -> tuple[list[ManifestRow], list[Reject]]:
    """Check every candidate on disk; return accepted rows (input order) and rejects.

    Duplicate ids: the first occurrence is validated, every later one is rejected as `duplicate_id`.
    """
    seen: dict[str, str] = {}
    unique: list[Candidate] = []
    rejects: list[Reject] = []
    for c in candidates:
        if c.image_id in seen:
            rejects.append(Reject(c.image_id, c.image_path, "duplicate_id", f"id already used by {seen[c.image_id]}"))
        else:
            seen[c.image_id] = c.image_path
            unique.append(c)
    root = Path(root)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(lambda c: _validate_one(c, root, num_classes, decode), unique),
                            total=len(unique), desc="validating images", unit="img", disable=not progress))
    rows = [r for r in results if isinstance(r, ManifestRow)]
    rejects += [r for r in results if isinstance(r, Reject)]
    return rows, rejects


def check_copy(rows: Sequence[ManifestRow], local_root: Path, url_root: str) -> None:
    """Refuse a URL dataset root whose objects differ from the validated local copy: every image and mask of `rows`
    must be there with the local file's size (one paged listing; contents are not compared)."""
    remote = storage.object_sizes(url_root)
    files = [p for r in rows for p in (r.image_path, r.mask_path) if p is not None]
    bad = [p for p in files if remote.get(p) != (local_root / p).stat().st_size]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"the dataset copy at {url_root} differs from {local_root}: {len(bad)} of {len(files)} files "
                        f"are missing there or of another size ({shown}); copy the dataset there (e.g. `aws s3 sync "
                        f"{local_root} {url_root}`) or fix --root")


def rejects_path(manifest_path: str | Path) -> Path:
    """`x/voc_train_aug.parquet` -> `x/voc_train_aug.rejects.jsonl`."""
    path = Path(manifest_path)
    return path.with_name(path.name.removesuffix(".parquet") + ".rejects.jsonl")


def manifest_target(out: str | Path, dataset: str, split: str) -> Path:
    """The manifest file `out` names: `out` itself when it ends in .parquet, else `<out>/<dataset>_<split>.parquet`.

    Checked before any image is read, so an output that cannot be written fails at once, not after validation:
    an existing folder where the manifest or its rejects file would go, or a file where a folder is needed."""
    out = Path(out)
    path = out if out.suffix == ".parquet" else out / f"{dataset}_{split}.parquet"
    for target in (path, rejects_path(path)):
        if target.is_dir():
            raise StorageError(f"cannot write {target}: it is an existing folder; remove it, or pass -o another "
                               f".parquet file path or folder")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise StorageError(f"output {out}: {blocker} is a file, not a folder; pass -o a path ending in .parquet, "
                           f"or a folder")
    return path


def write_rejects(path: str | Path, rejects: Iterable[Reject]) -> Path:
    """One JSON object per line (always written, so a stale file never survives a rebuild)."""
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in rejects)
    return atomic_write(Path(path), lambda tmp: tmp.write_text(lines))


def read_rejects(path: str | Path) -> list[Reject]:
    return [Reject(**json.loads(line)) for line in read_text(path, "rejects file").splitlines() if line.strip()]


def write_manifest(path: str | Path, rows: Sequence[ManifestRow], *, dataset: str, class_names: Sequence[str],
                   root: str | Path, command: str, class_set: str | None = None,
                   class_prompts: Sequence[str] | None = None) -> Path:
    """Write the Parquet manifest atomically, with the metadata of manifest_schema.json. `class_prompts`: what the
    CAMs prompt each class with, when a custom class file gives it (None: the class names)."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise DataError(f"manifest path {path} must end in .parquet")
    schema = arrow_schema()
    columns = {name: [getattr(r, name) for r in rows] for name in schema.names}
    columns["labels"] = [list(r.labels) for r in rows]
    meta = {"schema_version": schema_version(), "dataset": dataset, "class_set": class_set,
            "class_names": list(class_names), "root": absolute_location(root), "command": command,
            "class_prompts": None if class_prompts is None else list(class_prompts)}
    table = pa.Table.from_pydict(columns, schema=schema).replace_schema_metadata(
        {schema_spec()["metadata_key"]: json.dumps(meta)})
    return atomic_write(path, lambda tmp: pq.write_table(table, tmp))


@dataclass(frozen=True)
class Manifest:
    """A manifest read back: the Arrow table plus its metadata."""
    path: str | Path  # a local path or an fsspec URL
    table: pa.Table
    dataset: str
    class_set: str | None
    class_names: tuple[str, ...]
    root: str | Path  # a local folder, or an fsspec URL (s3://bucket/voc) every worker reads the images from
    command: str
    class_prompts: tuple[str, ...] | None = None  # per-class CAM prompts of a custom class file

    @cached_property
    def rows(self) -> tuple[ManifestRow, ...]:
        return tuple(ManifestRow(**{**d, "labels": tuple(d["labels"])}) for d in self.table.to_pylist())

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def image_abspath(self, row: ManifestRow) -> str | Path:
        return join_location(self.root, row.image_path)

    def mask_abspath(self, row: ManifestRow) -> str | Path | None:
        return None if row.mask_path is None else join_location(self.root, row.mask_path)


def read_manifest(path: str | Path, root: str | Path | None = None) -> Manifest:
    """Read and check a manifest, a local file or an fsspec URL (s3://bucket/train.parquet). `root` overrides the
    recorded root (data moved to another machine or to object storage)."""
    path = path if is_url(path) else Path(path)
    data = _manifest_bytes(path)
    try:
        table = pq.read_table(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file ({err}); rebuild it with `weclip manifest`") from None
    raw = (table.schema.metadata or {}).get(schema_spec()["metadata_key"].encode())
    if raw is None:
        raise DataError(f"{path} has no weclip manifest metadata; it was not written by `weclip manifest`")
    meta = json.loads(raw)
    if meta.get("schema_version") != schema_version():
        raise DataError(f"{path} has manifest schema version {meta.get('schema_version')}, this code reads "
                        f"{schema_version()}; rebuild it with `weclip manifest`")
    expected = arrow_schema()
    if not table.schema.remove_metadata().equals(expected):
        raise DataError(f"{path} columns {table.schema.names} with types {table.schema.types} do not match "
                        f"the manifest schema {expected.names}; rebuild it with `weclip manifest`")
    return Manifest(path=path, table=table, dataset=meta["dataset"], class_set=meta.get("class_set"),
                    class_names=tuple(meta["class_names"]), root=_root(meta["root"] if root is None else root),
                    command=meta["command"],
                    class_prompts=None if meta.get("class_prompts") is None else tuple(meta["class_prompts"]))


def _manifest_bytes(path: str | Path) -> pa.BufferReader:
    """The manifest file's bytes; MissingFileError when there is none (storage failures: StorageError)."""
    try:
        data = storage.read_bytes(path) if is_url(path) else Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        raise MissingFileError(f"manifest {path} does not exist; build it with `weclip manifest`") from None
    return pa.BufferReader(data)


def _root(root: str | Path) -> str | Path:
    """A recorded or given dataset root: a URL string as is, else a Path."""
    return str(root) if is_url(root) else Path(root)
