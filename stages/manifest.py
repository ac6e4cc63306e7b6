"""Stage `manifest`: list a dataset, validate every file, write the Parquet manifest and its rejects file.

Formats: `voc` (VOC 2012 layout), `coco` (COCO 2014), `folder` (images + CSV/JSON labels) and
`shapes` (the embedded world: VOC layout with the `shapes` class set). DESIGN.md §3.1.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ManifestConfig
from pipeline.data.coco import read_coco
from pipeline.data.folder import load_class_names, read_folder
from pipeline.data.manifest import Listing, rejects_path, validate, write_manifest, write_rejects
from pipeline.data.voc import read_voc
from pipeline.model.text import ClassSet, class_set as lookup_class_set

Format = Literal["voc", "coco", "folder", "shapes"]
FORMATS: tuple[str, ...] = ("voc", "coco", "folder", "shapes")


@dataclass(frozen=True)
class ManifestSummary:
    manifest_path: Path
    rejects_path: Path
    dataset: str
    split: str
    images: int  # rows written
    rejected: dict[str, int]  # reason -> count (see manifests/manifest_schema.json)
    class_counts: dict[str, int]  # class name -> number of images that contain it

    def to_dict(self) -> dict[str, Any]:
        return {"manifest": str(self.manifest_path), "rejects": str(self.rejects_path), "dataset": self.dataset,
                "split": self.split, "images": self.images, "rejected": dict(self.rejected),
                "class_counts": dict(self.class_counts)}


def _classes(fmt: str, class_set: str | ClassSet | None, class_names_file: str | Path | None
             ) -> tuple[tuple[str, ...], str | None]:
    """(class names, class-set name or None for a custom list)."""
    if class_names_file is not None:
        if class_set is not None:
            raise ValueError("give either class_set or class_names_file, not both")
        return load_class_names(class_names_file), None
    if class_set is None:
        if fmt == "folder":
            raise ValueError("format 'folder' needs class_set= (e.g. 'voc') or class_names_file= (one name per line)")
        class_set = fmt
    resolved = lookup_class_set(class_set) if isinstance(class_set, str) else class_set
    return resolved.classes, resolved.name


def _list(fmt: str, root: Path, split: str, names: tuple[str, ...], labels_from: str | None,
          list_file: str | Path | None, labels_file: str | Path | None, annotations: str | Path | None,
          cfg: ManifestConfig) -> Listing:
    if fmt in ("voc", "shapes"):
        return read_voc(root, split, names, list_file=list_file, labels_from=labels_from or cfg.voc_labels)
    if fmt == "coco":
        return read_coco(root, split, names, labels_from=labels_from or cfg.coco_labels, annotations=annotations,
                         list_file=list_file)
    if labels_file is None:
        raise ValueError("format 'folder' needs labels_file= (a CSV with 'image,labels' columns, or a JSON)")
    if labels_from is not None:
        raise ValueError("format 'folder' takes its labels from labels_file; do not pass labels_from")
    return read_folder(root, labels_file, names, split=split)


def run(fmt: Format, root: str | Path, out: str | Path, *, split: str | None = None,
        list_file: str | Path | None = None, labels_from: Literal["mask", "xml", "json"] | None = None,
        class_set: str | ClassSet | None = None, class_names_file: str | Path | None = None,
        labels_file: str | Path | None = None, annotations: str | Path | None = None,
        cfg: ManifestConfig = ManifestConfig(), progress: bool = True, command: str | None = None) -> ManifestSummary:
    """Build the manifest of one split of a dataset.

    fmt: voc | coco | folder | shapes. root: the dataset root. out: a `.parquet` path, or a folder
    (the file is then `<dataset>_<split>.parquet`). split: defaults to `cfg.<fmt>_split` (VOC
    train_aug, COCO train). list_file: a split list replacing the layout's (VOC/shapes/COCO).
    labels_from: VOC/shapes 'mask' (WeCLIP, default) or 'xml' (CLIP-ES); COCO 'mask' (default) or
    'json'. class_set: a `pipeline.model.text` class-set name or object (default: the format's own;
    folder needs it or class_names_file). labels_file: the folder format's CSV/JSON. annotations:
    COCO instances json if not in the usual place. command: recorded in the file (default: this call).
    Rejected images (with reasons) go to `<manifest>.rejects.jsonl` next to the manifest.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown manifest format {fmt!r}; choose one of {FORMATS}")
    if command is None:
        args = {"root": str(root), "out": str(out), "split": split, "list_file": list_file,
                "labels_from": labels_from, "class_set": getattr(class_set, "name", class_set),
                "class_names_file": class_names_file, "labels_file": labels_file, "annotations": annotations}
        command = f"stages.manifest.run({fmt!r}, " + ", ".join(
            f"{k}={str(v)!r}" for k, v in args.items() if v is not None) + ")"
    root = Path(root).resolve()
    split = split or getattr(cfg, f"{fmt}_split")
    names, set_name = _classes(fmt, class_set, class_names_file)
    listing = _list(fmt, root, split, names, labels_from, list_file, labels_file, annotations, cfg)
    rows, rejects = validate(listing.candidates, root, len(names), decode=cfg.decode, workers=cfg.decode_threads,
                             progress=progress)
    rejects = listing.rejects + rejects
    out = Path(out)
    manifest_path = out if out.suffix == ".parquet" else out / f"{fmt}_{split}.parquet"
    reject_file = write_rejects(rejects_path(manifest_path), rejects)
    if not rows:
        raise ValueError(f"no usable image in {root} (split {split!r}): all {len(rejects)} were rejected; "
                         f"see {reject_file}")
    write_manifest(manifest_path, rows, dataset=fmt, class_names=names, root=root, command=command,
                   class_set=set_name)
    counts = Counter(label for r in rows for label in r.labels)
    return ManifestSummary(manifest_path=manifest_path, rejects_path=reject_file, dataset=fmt, split=split,
                           images=len(rows), rejected=dict(sorted(Counter(r.reason for r in rejects).items())),
                           class_counts={names[i]: counts[i] for i in range(len(names))})
