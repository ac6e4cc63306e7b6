"""Prompt templates and CLIP-ES's sharpness (docs/algorithm.md §3.4): the built-in candidates, reading a templates
file, the per-image target scores and the score itself. Pure functions; the loop over a manifest is
`pipeline.inference.prompt_search`.

sharpness(template) = Σ_i var(s_i1 … s_ik) / Σ_i mean(s_i1 … s_ik)  ([PC] Eq. 5), where s_ij is the softmax score of
image i's j-th ground-truth class. Lower is better: CLIP-ES chose "a clean origami {}." as the lowest of the prompts
it tried (Fig. 3). var is the population variance (a one-class image has variance 0, as Eq. 5 allows k ≥ 1).
"""
from __future__ import annotations

from pathlib import Path
import typing
from typing import Sequence

import numpy as np
import torch

from weclip.pipeline.config import SharpnessSoftmax
from weclip.pipeline.data.textfile import read_text
from weclip.pipeline.errors import DataError

# What the softmax of a score runs over (config `text.sharpness_softmax`, docs/algorithm.md §3.4):
# cam = the image's classes + the background prompts (the softmax its Grad-CAM differentiates, the default);
# all = every class of the dataset + the background prompts ([PC] Eq. 3's C classes, plus the background set);
# labels = the image's classes only (a k-class image's scores then always average 1/k).
SOFTMAX_OVER: tuple[str, ...] = typing.get_args(SharpnessSoftmax)

PAPER_TEMPLATE = "a clean origami {}."  # CLIP-ES's choice ([PC] §3.2.1), WeCLIP's template

# 20 of the 80 ImageNet templates of OpenAI's CLIP (github.com/openai/CLIP, notebooks/Prompt_Engineering_for_
# ImageNet.ipynb), the pool CLIP-ES drew its 20 candidates from ([PC] §3.2.1, footnote 1). The paper does not list
# its 20 (they are only the labels of Fig. 3); these are the plain CLIP prompt plus ones carrying every word the paper
# names as helpful ("origami", "rendering", "clean", "large", "weird"), the rest picked across the list's kinds
# (photo qualities, art forms, objects). The paper's own choice, a combination found "after trial and error",
# comes last.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a drawing of a {}.",
    "the plastic {}.",
    "a painting of a {}.",
    "a origami {}.",
    "the toy {}.",
    "a photo of a large {}.",
    "a photo of a weird {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of a {}.",
)
BUILTIN_TEMPLATES: tuple[str, ...] = IMAGENET_TEMPLATES + (PAPER_TEMPLATE,)
BUILTIN = "builtin"  # the name that selects BUILTIN_TEMPLATES instead of a file


def check_template(template: str, where: str) -> str:
    """A template must hold exactly one `{}` and no other braces (it is filled with `str.format`)."""
    if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.replace("{}", "").count("}"):
        raise DataError(f"{where}: template {template!r} must contain exactly one {{}} (where the class name goes) "
                        "and no other braces, e.g. 'a photo of a {}.'")
    return template


def read_templates(path: str | Path) -> tuple[str, ...]:
    """One template per line; blank lines and lines starting with '#' are skipped; surrounding spaces are dropped.
    A line without its `{}` is a DataError naming the file and the line, and so is a file with no template."""
    text = read_text(path, "templates file")
    templates = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            templates.append(check_template(line, f"templates file {path}, line {number}"))
    if not templates:
        raise DataError(f"templates file {path} holds no template; write one per line, e.g. 'a photo of a {{}}.'")
    if len(set(templates)) != len(templates):
        repeated = next(t for t in templates if templates.count(t) > 1)
        raise DataError(f"templates file {path} lists {repeated!r} twice; give each template once")
    return tuple(templates)


def load_templates(source: str | Path) -> tuple[str, ...]:
    """`builtin` → BUILTIN_TEMPLATES, anything else → `read_templates` of that file."""
    return BUILTIN_TEMPLATES if str(source) == BUILTIN else read_templates(source)


def target_scores(fg_logits: torch.Tensor, bg_logits: torch.Tensor, labels: Sequence[Sequence[int]],
                  over: SharpnessSoftmax = "cam") -> list[np.ndarray]:
    """Per image, the softmax scores s_i1 … s_ik of its ground-truth classes, in label order.

    fg_logits: B×C image–class logits (logit_scale · cosine), bg_logits: B×M image–background logits, labels: each
    image's class ids. `over` picks the softmax's entries (see SOFTMAX_OVER)."""
    if over not in SOFTMAX_OVER:
        raise DataError(f"sharpness softmax {over!r} is not one of {', '.join(SOFTMAX_OVER)}")
    out = []
    for fg, bg, ids in zip(fg_logits.double(), bg_logits.double(), labels):
        ids = list(ids)
        if over == "all":
            probs = torch.cat([fg, bg]).softmax(dim=0)[ids]
        elif over == "cam":
            probs = torch.cat([fg[ids], bg]).softmax(dim=0)[:len(ids)]
        else:
            probs = fg[ids].softmax(dim=0)
        out.append(probs.numpy())
    return out


def sharpness(scores: Sequence[np.ndarray]) -> float:
    """[PC] Eq. 5 over the images' target-score vectors: Σ_i var(s_i) / Σ_i mean(s_i), population variance."""
    if not scores or any(len(s) == 0 for s in scores):
        raise DataError("sharpness needs at least one image, each with at least one ground-truth class")
    return float(sum(np.var(s) for s in scores) / sum(np.mean(s) for s in scores))
