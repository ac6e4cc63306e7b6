"""Prompts, class-name lists (with the released code's synonyms), background sets and text embeddings.

A *class set* is the data a dataset needs on the text side: the canonical class names (what reports
print), the names put into prompts (synonyms comma-joined, as `clip_text.py` does), and the background
prompts appended to every image's text set (docs/algorithm.md §3.3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from weclip.pipeline.config import TextConfig
from weclip.pipeline.errors import DataError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
VOC_SYNONYMS = {
    "bird": "bird avian",
    "chair": "chair seat",
    "person": "person with clothes,people,human",
    "tvmonitor": "tvmonitor screen",
}
VOC_BACKGROUND = (
    "ground", "land", "grass", "tree", "building", "wall", "sky", "lake", "water", "river", "sea",
    "railway", "railroad", "keyboard", "helmet", "cloud", "house", "mountain", "ocean", "road", "rock",
    "street", "valley", "bridge", "sign",
)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorbike", "aeroplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag",
    "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog",
    "pizza", "donut", "cake", "chair", "sofa", "pottedplant", "bed", "diningtable", "toilet",
    "tvmonitor", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
COCO_SYNONYMS = {
    "person": "person with clothes,people,human",
    "bird": "bird avian",
    "backpack": "backpack,bag",
    "umbrella": "umbrella,parasol",
    "handbag": "handbag,purse",
    "tie": "necktie",
    "snowboard": "sknowboard",  # typo kept from the released code
    "baseball glove": "glove",
    "spoon": "dessertspoon",
    "chair": "chair seat",
    "tvmonitor": "tvmonitor screen",
    "remote": "remote control",
    "hair drier": "hairdrier,blowdrier",
}
COCO_BACKGROUND = tuple(n for n in VOC_BACKGROUND if n not in ("keyboard", "sign"))


# The embedded "shapes" world (pipeline/data/shapes.py draws them; docs/design.md §5). Prompt names carry the article
# so that one template serves objects and backgrounds: "a photo of a ball." / "a photo of grass.".
SHAPES_CLASSES = ("ball", "star", "box", "triangle", "ring", "heart")
SHAPES_BACKGROUND = ("sky", "grass", "water", "sand", "bricks", "road")


@dataclass(frozen=True)
class ClassSet:
    name: str
    classes: tuple[str, ...]  # canonical names, index = 0-based foreground class id
    prompt_names: tuple[str, ...]  # what goes into the template, synonyms included
    background: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Foreground classes; segmentation heads have num_classes + 1 outputs (0 = background)."""
        return len(self.classes)

    def prompts(self, template: str) -> list[str]:
        """Every prompt the CAMs use, in order: the class prompts (synonyms included), then the background ones."""
        return prompts(self.prompt_names, template) + prompts(self.background, template)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "classes": list(self.classes), "prompt_names": list(self.prompt_names),
                "background": list(self.background)}

    @classmethod
    def from_dict(cls, data: dict) -> "ClassSet":
        return cls(str(data["name"]), tuple(data["classes"]), tuple(data["prompt_names"]), tuple(data["background"]))


def _with_synonyms(classes: tuple[str, ...], synonyms: dict[str, str]) -> tuple[str, ...]:
    return tuple(synonyms.get(c, c) for c in classes)


CLASS_SETS: dict[str, ClassSet] = {
    "voc": ClassSet("voc", VOC_CLASSES, _with_synonyms(VOC_CLASSES, VOC_SYNONYMS), VOC_BACKGROUND),
    "coco": ClassSet("coco", COCO_CLASSES, _with_synonyms(COCO_CLASSES, COCO_SYNONYMS), COCO_BACKGROUND),
    "shapes": ClassSet("shapes", SHAPES_CLASSES, tuple(f"a {c}" for c in SHAPES_CLASSES), SHAPES_BACKGROUND),
}


def class_set(name: str) -> ClassSet:
    try:
        return CLASS_SETS[name]
    except KeyError:
        raise DataError(f"unknown class set {name!r}; known: {sorted(CLASS_SETS)}") from None


def prompts(names: Sequence[str], template: str) -> list[str]:
    return [template.format(n) for n in names]


CUSTOM = "custom"  # the name of a class set that a manifest defines with its own class list


def dataset_class_set(class_names: Sequence[str], set_name: str | None, prompt_names: Sequence[str] | None = None,
                      background: Sequence[str] | None = None) -> ClassSet:
    """The class set a dataset's images are prompted with, from what its manifest records.

    A built-in set (`set_name` voc / coco / shapes) keeps its synonyms and background names; a custom class list
    (`set_name` None) is prompted with its own names, or the per-class prompts of its class file, and VOC's
    background names. `background` (config `text.background`) replaces the background names of either."""
    if set_name is not None:
        builtin = class_set(set_name)
        require_classes(class_names, "the manifest's class list", builtin.classes, f"class set {set_name!r}",
                        "rebuild the manifest")
        chosen = builtin
    else:
        chosen = ClassSet(CUSTOM, tuple(class_names), tuple(prompt_names or class_names), VOC_BACKGROUND)
    if len(chosen.prompt_names) != len(chosen.classes):
        raise DataError(f"{len(chosen.prompt_names)} class prompts for {len(chosen.classes)} classes; give one "
                        "prompt per class")
    return chosen if background is None else dataclasses.replace(chosen, background=tuple(background))


def manifest_class_set(manifest, text: TextConfig, error: type[Exception] = DataError) -> ClassSet:
    """The class set of a manifest (`dataset_class_set`), refusing one of another built-in dataset than the one the
    preset is tuned for (`text.classes`)."""
    if manifest.class_set is not None and manifest.class_set != text.classes:
        raise error(f"manifest {manifest.path} holds the classes of dataset {manifest.class_set!r}, but the preset is "
                    f"tuned for class set {text.classes!r}; use the matching preset (--preset {manifest.class_set})")
    return dataset_class_set(manifest.class_names, manifest.class_set, manifest.class_prompts, text.background)


@dataclass(frozen=True)
class TextEmbeddings:
    fg: torch.Tensor  # C × E, L2-normalised, row = class id
    bg: torch.Tensor  # M × E, L2-normalised

    def per_image(self, labels: list[int]) -> torch.Tensor:
        """The per-image text set: present classes in the given order, then every background prompt."""
        return torch.cat([self.fg[list(labels)], self.bg], dim=0)


_EMBEDDING_CACHE: dict[tuple, TextEmbeddings] = {}


def text_embeddings(backbone, classes: ClassSet, template: str) -> TextEmbeddings:
    """Prompt embeddings of a class set, computed once per (model identity, prompts) and cached.

    `backbone.encode_text(list[str])` returns one L2-normalised row per prompt (docs/algorithm.md §3.3: one template,
    so the mean over templates and the second normalisation change nothing).
    """
    fg_prompts = prompts(classes.prompt_names, template)
    bg_prompts = prompts(classes.background, template)
    key = (backbone.identity, tuple(fg_prompts), tuple(bg_prompts))
    if key not in _EMBEDDING_CACHE:
        with torch.no_grad():
            emb = backbone.encode_text(fg_prompts + bg_prompts).float()
        _EMBEDDING_CACHE[key] = TextEmbeddings(fg=emb[: len(fg_prompts)], bg=emb[len(fg_prompts):])
    return _EMBEDDING_CACHE[key]


def require_classes(found: Sequence[str], found_what: str, expected: Sequence[str], expected_what: str, fix: str,
                    error: type[Exception] = DataError) -> None:
    """The one check that two class lists agree (a manifest's against a class set, a cache's or a checkpoint's).

    Raises `error` naming both sides, their first classes and `fix`; the callers pass their stage's error type."""
    if tuple(found) != tuple(expected):
        raise error(f"{found_what}, with {len(found)} classes {list(found[:4])}..., does not have the classes of "
                    f"{expected_what} ({len(expected)} classes {list(expected[:4])}...); {fix}")
