"""The dataset layouts `weclip manifest` reads, as data: one `Layout` per format (docs/design.md §3.1).

A layout says how to list a dataset (its reader), what it defaults to (class set, split, label source), which
optional inputs it reads and which of them it cannot do without, and the config preset that trains on it. A new
dataset is a reader module (a function returning a `Listing`, like pipeline/data/voc.py) plus one entry in
`LAYOUTS`; stages/manifest.py looks the format up here and never branches on its name.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from weclip.pipeline.data import coco, folder, voc
from weclip.pipeline.data.manifest import Listing
from weclip.pipeline.errors import DataError
from weclip.pipeline.model.text import ClassSet, class_set as lookup_class_set


@dataclass(frozen=True)
class Inputs:
    """What the user gave for one dataset; a layout reads the parts it declares, so every reader has one signature."""
    root: Path
    split: str
    class_names: tuple[str, ...]
    labels_from: str | None = None
    list_file: str | Path | None = None
    labels_file: str | Path | None = None
    annotations: str | Path | None = None


# The optional inputs, with the hint an error gives when a layout needs one that is missing.
OPTION_HINTS = {
    "list_file": "list_file= (an id list replacing the layout's split list)",
    "labels_file": "labels_file= (a CSV with 'image,labels' columns, or a JSON)",
    "annotations": "annotations= (a COCO instances_*.json)",
}
CLASS_HINT = "class_set= (e.g. 'voc') or class_names_file= (one name per line)"


@dataclass(frozen=True)
class Layout:
    """One dataset format: its reader and what `weclip manifest <name>` assumes when the user does not say."""
    name: str
    read: Callable[[Inputs], Listing]
    split: str  # the split built when none is given
    class_set: str | None  # the class set used when none is given; None: the user must give one
    labels_from: tuple[str, ...]  # allowed label sources, the default first; () = the labels come from labels_file
    options: tuple[str, ...] = ()  # the optional inputs (keys of OPTION_HINTS) it reads
    needs: tuple[str, ...] = ()  # the options it cannot do without
    preset: str | None = None  # the config preset that trains on it (None: the one matching the chosen class set)

    def check(self, inputs: Inputs) -> None:
        """Refuse inputs this layout would ignore or misread, and missing ones it needs."""
        for option in self.needs:
            if getattr(inputs, option) is None:
                raise DataError(f"format {self.name!r} needs {OPTION_HINTS[option]}")
        for option in OPTION_HINTS:
            if option not in self.options and getattr(inputs, option) is not None:
                raise DataError(f"format {self.name!r} does not read {option}=; drop it "
                                f"(it reads: {', '.join(self.options) or 'no optional inputs'})")
        if inputs.labels_from is not None and inputs.labels_from not in self.labels_from:
            if not self.labels_from:
                raise DataError(f"format {self.name!r} has a single label source; do not pass labels_from")
            raise DataError(f"format {self.name!r} reads labels_from {self.labels_from}, not {inputs.labels_from!r}")

    def list(self, inputs: Inputs) -> Listing:
        """Check the inputs, fill in the default label source and run the reader."""
        self.check(inputs)
        default = self.labels_from[0] if self.labels_from else None
        return self.read(replace(inputs, labels_from=inputs.labels_from or default))


def _read_voc(q: Inputs) -> Listing:
    return voc.read_voc(q.root, q.split, q.class_names, list_file=q.list_file, labels_from=q.labels_from)


def _read_coco(q: Inputs) -> Listing:
    return coco.read_coco(q.root, q.split, q.class_names, labels_from=q.labels_from, annotations=q.annotations,
                          list_file=q.list_file)


def _read_folder(q: Inputs) -> Listing:
    return folder.read_folder(q.root, q.labels_file, q.class_names, split=q.split)


_LAYOUTS = (
    # WeCLIP trains VOC on train_aug (10,582 ids, docs/algorithm.md §7.1); labels: WeCLIP's GT-PNG values, or CLIP-ES's XML
    Layout("voc", _read_voc, split="train_aug", class_set="voc", labels_from=voc.LABEL_SOURCES,
           options=("list_file",), preset="voc"),
    # COCO train2014; labels: WeCLIP's SegmentationClass PNGs, or the instances json
    Layout("coco", _read_coco, split="train", class_set="coco", labels_from=coco.LABEL_SOURCES,
           options=("list_file", "annotations"), preset="coco"),
    # a folder of images named by a CSV/JSON labels file, with the user's class list
    Layout("folder", _read_folder, split="train", class_set=None, labels_from=(),
           options=("labels_file",), needs=("labels_file",)),
    # the embedded world: the VOC layout pipeline/data/shapes.py writes, ImageSets/Segmentation/<split>.txt
    Layout("shapes", _read_voc, split="train", class_set="shapes", labels_from=voc.LABEL_SOURCES,
           options=("list_file",), preset="shapes"),
)
LAYOUTS: dict[str, Layout] = {entry.name: entry for entry in _LAYOUTS}


def names() -> tuple[str, ...]:
    return tuple(LAYOUTS)


def layout(name: str) -> Layout:
    try:
        return LAYOUTS[name]
    except KeyError:
        raise DataError(f"unknown manifest format {name!r}; choose one of {names()}") from None


def resolve_classes(entry: Layout, class_set: str | ClassSet | None, class_names_file: str | Path | None
                    ) -> tuple[tuple[str, ...], str | None]:
    """(class names, class-set name or None for a custom list): the user's choice, else the layout's own."""
    if class_names_file is not None:
        if class_set is not None:
            raise DataError("give either class_set or class_names_file, not both")
        return folder.load_class_names(class_names_file), None
    if class_set is None:
        if entry.class_set is None:
            raise DataError(f"format {entry.name!r} needs {CLASS_HINT}")
        class_set = entry.class_set
    resolved = lookup_class_set(class_set) if isinstance(class_set, str) else class_set
    return resolved.classes, resolved.name
