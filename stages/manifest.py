"""Stage `manifest`: list a dataset, validate every file, write the Parquet manifest and its rejects file.

The formats are the layouts of `pipeline/data/registry.py` (voc, coco, folder, shapes); this stage looks the
format up there, so a new dataset needs no change here. docs/design.md §3.1.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weclip.pipeline.config import ManifestConfig
from weclip.pipeline.data.folder import load_class_prompts
from weclip.pipeline.data.manifest import check_copy, manifest_target, rejects_path, validate, write_manifest, write_rejects
from weclip.pipeline.data.registry import Inputs, layout, names, resolve_classes
from weclip.pipeline.errors import DataError
from weclip.pipeline.model.text import ClassSet

FORMATS: tuple[str, ...] = names()


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


def _call(fmt: str, args: dict[str, Any]) -> str:
    """The Python call that rebuilds this manifest, recorded in its metadata when no command line is given."""
    return f"weclip.stages.manifest.run({fmt!r}, " + ", ".join(
        f"{k}={str(v)!r}" for k, v in args.items() if v is not None) + ")"


def run(fmt: str, root: str | Path, out: str | Path, *, split: str | None = None,
        list_file: str | Path | None = None, labels_from: str | None = None,
        class_set: str | ClassSet | None = None, class_names_file: str | Path | None = None,
        labels_file: str | Path | None = None, annotations: str | Path | None = None,
        cfg: ManifestConfig = ManifestConfig(), progress: bool = True, command: str | None = None,
        record_root: str | None = None) -> ManifestSummary:
    """Build the manifest of one split of a dataset.

    fmt: voc | coco | folder | shapes. root: the dataset root. out: a `.parquet` path, or a folder
    (the file is then `<dataset>_<split>.parquet`). split: defaults to the layout's (VOC train_aug,
    COCO/folder/shapes train). list_file: a split list replacing the layout's (VOC/shapes/COCO).
    labels_from: VOC/shapes 'mask' (WeCLIP, default) or 'xml' (CLIP-ES); COCO 'mask' (default) or
    'json'. class_set: a `pipeline.model.text` class-set name or object (default: the format's own;
    folder needs it or class_names_file). labels_file: the folder format's CSV/JSON. annotations:
    COCO instances json if not in the usual place. command: recorded in the file (default: this call).
    record_root: the dataset root to record instead of `root`, an fsspec URL (s3://bucket/voc) every extract worker
    reads the images from; `root` is a local copy, validated here, whose files must be there with the same sizes.
    Rejected images (with reasons) go to `<manifest>.rejects.jsonl` next to the manifest.
    """
    entry = layout(fmt)
    if command is None:
        command = _call(fmt, {"root": str(root), "out": str(out), "split": split, "list_file": list_file,
                              "labels_from": labels_from, "class_set": getattr(class_set, "name", class_set),
                              "class_names_file": class_names_file, "labels_file": labels_file,
                              "annotations": annotations, "record_root": record_root})
    root = Path(root).resolve()
    split = split or entry.split
    manifest_path = manifest_target(out, fmt, split)
    classes, set_name = resolve_classes(entry, class_set, class_names_file)
    listing = entry.list(Inputs(root, split, classes, labels_from=labels_from, list_file=list_file,
                                labels_file=labels_file, annotations=annotations))
    rows, rejects = validate(listing.candidates, root, len(classes), decode=cfg.decode, workers=cfg.decode_threads,
                             progress=progress)
    rejects = listing.rejects + rejects
    reject_file = write_rejects(rejects_path(manifest_path), rejects)
    if not rows:
        raise DataError(f"no usable image in {root} (split {split!r}): all {len(rejects)} were rejected; "
                        f"see {reject_file}")
    if record_root is not None:
        check_copy(rows, root, record_root)
    prompts = None if class_names_file is None else load_class_prompts(class_names_file)
    write_manifest(manifest_path, rows, dataset=fmt, class_names=classes, root=record_root or root, command=command,
                   class_set=set_name, class_prompts=prompts)
    counts = Counter(label for r in rows for label in r.labels)
    return ManifestSummary(manifest_path=manifest_path, rejects_path=reject_file, dataset=fmt, split=split,
                           images=len(rows), rejected=dict(sorted(Counter(r.reason for r in rejects).items())),
                           class_counts={classes[i]: counts[i] for i in range(len(classes))})
