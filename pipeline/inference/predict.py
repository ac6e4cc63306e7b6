"""A trained checkpoint with its frozen backbone, ready to predict; and the manifest readers evaluation shares.

`load_predictor` loads the backbone the checkpoint's config names and refuses it unless its identity is the one the
decoder was trained on. `Predictor.predict` gives the msc + flip argmax labels of an image (§8.1), or the DenseCRF
job of WeCLIP's inference (§8.1 step 6) for `pipeline.inference.crf_pool`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from weclip.pipeline.cache import fingerprint as fp
from weclip.pipeline.config import Config, EvalConfig
from weclip.pipeline.data.augment import normalise
from weclip.pipeline.data.images import ImageDecodeError, load_manifest_rgb, load_mask
from weclip.pipeline.data.manifest import Manifest, ManifestRow
from weclip.pipeline.errors import EvalError, MissingFile
from weclip.pipeline.inference.crf_pool import CrfJob
from weclip.pipeline.inference.segment import SegFn, clipes_cam_scores, clipes_input, floor_to_patches, msc_flip_logits, resize_long_side, segment_fn, weclip_cam_maps
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.model.protocol import CLIPBackbone
from weclip.pipeline.model.text import ClassSet, require_classes, text_embeddings
from weclip.pipeline.refinement.crf import clipes_crf_image
from weclip.pipeline.training.checkpoint import Checkpoint, build_decoder_from_checkpoint, load_checkpoint
from weclip.pipeline.visualize import cam_panels

BACKGROUND = "background"


@dataclass
class Predictor:
    checkpoint: Checkpoint
    backbone: CLIPBackbone
    decoder: WeCLIPDecoder
    seg: SegFn

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the decoder's outputs: background, then the checkpoint's classes."""
        return (BACKGROUND, *self.checkpoint.class_names)

    def normalised(self, rgb: np.ndarray) -> torch.Tensor:
        """H×W×3 uint8 → 1×3×H×W with the statistics the backbone saw in training."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(self.backbone.device)
        return normalise(image, self.checkpoint.config.model.normalisation)

    def logits(self, rgb: np.ndarray, cfg: EvalConfig) -> torch.Tensor:
        """C×H×W multi-scale + flip logits (§8.1)."""
        return msc_flip_logits(self.seg, self.normalised(rgb), cfg)

    def predict(self, key: str, rgb: np.ndarray, cfg: EvalConfig, crf: bool) -> np.ndarray | CrfJob:
        """argmax labels H×W uint8, or the WeCLIP DenseCRF job: softmax of the logits on the RGB image (§8.1 step 6)."""
        logits = self.logits(rgb, cfg)
        if not crf:
            return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
        probs = torch.softmax(logits.float(), dim=0).cpu().numpy()
        return CrfJob(key, rgb, probs, np.arange(probs.shape[0]), cfg.crf_params)


def load_predictor(checkpoint: str | Path, device: str | torch.device, model_configs: Sequence[str | Path] = (),
                   pretrained: str | None = None) -> Predictor:
    """Checkpoint → the backbone its config records and its decoder, checked to belong together.

    `pretrained` points to the backbone's weights when they moved since training (`--set model.pretrained=PATH`);
    they must be the recorded ones (the identity holds their sha256)."""
    ckpt = load_checkpoint(checkpoint)
    if pretrained is not None:
        ckpt = dataclasses.replace(ckpt, config=ckpt.config.replace(model={"pretrained": pretrained}))
    cfg = ckpt.config
    try:
        backbone = load_backbone(cfg.model, device, model_configs)
    except MissingFile as err:
        raise EvalError(f"the backbone of checkpoint {ckpt.path} cannot be loaded: {err}. If its weights moved, "
                        "give their new path with --set model.pretrained=PATH") from err
    trained_on = ckpt.fingerprint.get("checkpoint")
    if trained_on != backbone.identity:
        raise EvalError(f"checkpoint {ckpt.path} was trained on features of backbone {trained_on!r}, but "
                        f"{cfg.model.name} with pretrained={cfg.model.pretrained!r} is {backbone.identity!r}; give "
                        "the weights it was trained with (--set model.pretrained=PATH)")
    decoder = build_decoder_from_checkpoint(ckpt).to(backbone.device)
    return Predictor(ckpt, backbone, decoder, segment_fn(backbone, decoder, cfg.extract.feature_layers))


def check_classes(ckpt: Checkpoint, manifest: Manifest) -> None:
    """The manifest's classes must be the checkpoint's (names and the fingerprint's class hash)."""
    require_classes(manifest.class_names, f"manifest {manifest.path} of dataset {manifest.dataset!r}",
                    ckpt.class_names, f"checkpoint {ckpt.path}", "evaluate a checkpoint trained on this dataset's "
                    "class set", EvalError)
    if fp.sha256_json(list(manifest.class_names)) != ckpt.fingerprint.get("classes_sha256"):
        raise EvalError(f"checkpoint {ckpt.path} records class names whose hash differs from its fingerprint's "
                        f"classes_sha256; the file is inconsistent, use another checkpoint of the run")


def read_rgb(manifest: Manifest, row: ManifestRow) -> np.ndarray:
    """A manifest image, which must still decode at the manifest's size (errors name the image)."""
    path = manifest.image_abspath(row)
    try:
        return load_manifest_rgb(path, row.height, row.width)
    except ImageDecodeError as err:
        raise EvalError(f"image {row.image_id} ({path}) cannot be used: {err}. Every manifest image is "
                        "counted; fix the file or rebuild the manifest") from err


def read_gt(manifest: Manifest, row: ManifestRow) -> np.ndarray:
    path = manifest.mask_abspath(row)
    try:
        mask = load_mask(path)
    except ImageDecodeError as err:
        raise EvalError(f"mask of image {row.image_id} ({path}) cannot be decoded: {err}") from err
    if mask.shape != (row.height, row.width):
        raise EvalError(f"mask of image {row.image_id} ({path}) is {mask.shape[0]}x{mask.shape[1]}, the image "
                        f"{row.height}x{row.width}; rebuild the manifest")
    return mask


def cam_panels_of(predictor: Predictor, rgb: np.ndarray, labels: Sequence[int], cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Image, CAM, refined CAM and online pseudo label of one image (WeCLIP 'val' mode, RFM on), at the image size."""
    ckpt_cfg = predictor.checkpoint.config
    text = text_embeddings(predictor.backbone, predictor.checkpoint.classes, ckpt_cfg.text.template)
    x = floor_to_patches(resize_long_side(predictor.normalised(rgb), cfg.long_side), predictor.backbone.patch_size)
    maps = weclip_cam_maps(predictor.backbone, predictor.decoder, text, x, labels, ckpt_cfg.extract.feature_layers,
                           ckpt_cfg)
    return cam_panels(rgb, maps.cams.cpu().numpy(), maps.refined.cpu().numpy(), maps.pseudo.cpu().numpy())


def clipes_tensor(backbone: CLIPBackbone, rgb: np.ndarray, cfg: Config) -> torch.Tensor:
    """CLIP-ES's network input of an H×W×3 uint8 image, 1×3×H'×W' on the backbone's device: bicubic resize to
    multiples of the patch size (§5.1) and the statistics of `eval.clipes_normalisation` ("preset": the model's)."""
    stats = cfg.model.normalisation if cfg.eval.clipes_normalisation == "preset" else cfg.eval.clipes_normalisation
    resized = torch.from_numpy(np.array(clipes_input(rgb, backbone.patch_size)))  # a writable copy
    return normalise(resized.permute(2, 0, 1)[None].to(backbone.device), stats)


def clipes_predictor(cfg: Config, classes: ClassSet, device: torch.device, model_configs: Sequence[str | Path],
                     visualize: int, panels: dict[str, dict[str, np.ndarray]]):
    """predict((index, row, rgb)) → the CLIP-ES CrfJob of a manifest image: bicubic resize to a multiple of the patch
    size and CLIP-ES normalisation (§5.1), Softmax-Grad-CAM + CAA on the whole image (§4, §5.2), DenseCRF with
    CLIP-ES's parameters and confidence threshold (§5.3). Keeps the CAM panels of the first `visualize` images."""
    backbone = load_backbone(cfg.model, device, model_configs)
    text = text_embeddings(backbone, classes, cfg.text.template)

    def predict(item: tuple[int, ManifestRow, np.ndarray]) -> CrfJob:
        index, row, rgb = item
        x = clipes_tensor(backbone, rgb, cfg)
        maps = clipes_cam_scores(backbone, text, x, row.labels, rgb.shape[:2], cfg.refine)
        if index < visualize:
            panels[row.image_id] = cam_panels(rgb, maps.cams.cpu().numpy(), maps.refined.cpu().numpy())
        image = rgb if cfg.eval.clipes_crf_image == "rgb" else clipes_crf_image(rgb[..., ::-1].astype(np.float32))
        return CrfJob(row.image_id, image, maps.scores.cpu().numpy(), maps.keys.cpu().numpy(),
                      cfg.eval.clipes_crf_params, cfg.eval.clipes_confidence)

    return predict
