"""Scoring prompt templates over a manifest with the frozen backbone (docs/algorithm.md §3.4): CLIP-ES's sharpness,
and optionally the raw-CAM mIoU of each template against the manifest's masks.

Every image is read once and passed through the backbone at CLIP-ES's input (`clipes_tensor`: bicubic resize to
multiples of the patch, CLIP-ES statistics, §5.1). The image embedding does not depend on the template, so the
sharpness of any number of templates costs one image forward each plus one text encoding per template. The raw-CAM
mIoU needs one Softmax-Grad-CAM per (image, template), blocks 1..n-1 shared between the templates: the CAMs of the image's classes (§4), bilinear to the image
size, labels = argmax of [(1 − max CAM)^p, CAMs] with p = `refine.bg_power` (§5.3), no CAA, no CRF.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from scipy import stats
from tqdm import tqdm

from weclip.pipeline.config import Config
from weclip.pipeline.data.manifest import Manifest
from weclip.pipeline.errors import EvalError
from weclip.pipeline.inference.predict import clipes_tensor, read_gt, read_rgb
from weclip.pipeline.metrics import ConfusionMatrix
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.cam import softmax_gradcam
from weclip.pipeline.model.prompts import sharpness, target_scores
from weclip.pipeline.model.text import manifest_class_set, text_embeddings
from weclip.pipeline.refinement.refine import cams_to_labels, upsample_cams


@dataclass(frozen=True)
class TemplateScore:
    template: str
    sharpness: float
    cam_miou: float | None  # raw Softmax-Grad-CAM mIoU in [0, 1], background included; None when not asked


@dataclass(frozen=True)
class PromptScores:
    scores: tuple[TemplateScore, ...]  # ranked: lowest sharpness first
    images: int  # images scored (with at least one class)
    unlabelled: tuple[str, ...]  # images without a class: they have no target score and are left out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation, None where it is undefined (fewer than 3 pairs, or a constant side)."""
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None
    return float(stats.spearmanr(x, y).statistic)


def score_templates(cfg: Config, data: Manifest, templates: Sequence[str], device: torch.device,
                    cam_miou: bool = False, model_configs: Sequence[str | Path] = (),
                    progress: bool = True) -> PromptScores:
    """The sharpness (softmax over `cfg.text.sharpness_softmax`) of each template on the manifest's images, and with
    `cam_miou` the raw-CAM mIoU of each (every image needs a mask then); ranked by sharpness."""
    rows = [row for row in data.rows if row.labels]
    unlabelled = tuple(row.image_id for row in data.rows if not row.labels)
    if not rows:
        raise EvalError(f"manifest {data.path} has no image with a class label; sharpness needs image-level labels")
    if cam_miou and any(row.mask_path is None for row in rows):
        missing = [row.image_id for row in rows if row.mask_path is None]
        raise EvalError(f"manifest {data.path} has {len(missing)} images without a mask (e.g. {missing[:3]}); "
                        "--cam-miou needs ground truth, or leave it out to rank by sharpness alone")
    classes = manifest_class_set(data, cfg.text, EvalError)
    backbone = load_backbone(cfg.model, device, model_configs)
    texts = {t: text_embeddings(backbone, classes, t) for t in templates}
    matrices = {t: ConfusionMatrix(classes.num_classes + 1) for t in templates} if cam_miou else {}
    embeddings = []
    for row in tqdm(rows, desc="prompts", unit="img", disable=not progress):
        rgb = read_rgb(data, row)
        x = clipes_tensor(backbone, rgb, cfg)
        embeddings.append(backbone.encode_image(x))
        if cam_miou:
            gt = read_gt(data, row)
            frozen = backbone.forward_frozen(x, token_layers=(), attn_layers=())  # shared by every template
            for template, matrix in matrices.items():
                cams = softmax_gradcam(backbone, x, [list(row.labels)], texts[template], feature_layers=(),
                                       attn_layers=(), frozen=frozen)
                labels = cams_to_labels(upsample_cams(cams.cams, rgb.shape[:2]), cams.cam_classes,
                                        cfg.refine.bg_power)
                matrix.update(labels[0].cpu().numpy(), gt)
    image_emb = torch.cat(embeddings)
    labels = [list(row.labels) for row in rows]
    scores = []
    for template, text in texts.items():
        fg, bg = (backbone.logit_scale * image_emb @ t.to(image_emb.device).T for t in (text.fg, text.bg))
        value = sharpness(target_scores(fg.cpu(), bg.cpu(), labels, cfg.text.sharpness_softmax))
        scores.append(TemplateScore(template, value, matrices[template].miou() if cam_miou else None))
    return PromptScores(tuple(sorted(scores, key=lambda s: s.sharpness)), len(rows), unlabelled)
