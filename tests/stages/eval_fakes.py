"""Shared pieces of the evaluate / infer / pseudo tests: a tiny fake VOC tree with its manifest, the tiny-ViT config
and a checkpoint holding a random (untrained) decoder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.data import data_fakes as fk

from tests import conftest
from weclip.pipeline.cache.fingerprint import fingerprint_from_config
from weclip.pipeline.training.checkpoint import save_checkpoint
from weclip.pipeline.config import Config
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.training.optim import PolyWarmup, build_optimizer
from weclip.pipeline.model.text import manifest_class_set
from weclip.stages import manifest as manifest_stage

TESTS = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(conftest.TINY_CONFIG)  # passed on to Ray workers and child processes
# Mask pixel values per image (label = value - 1), VOC class ids.
IMAGES = {"a": [8, 12], "b": [15], "c": [3, 5, 9], "d": [1], "e": [20, 2]}
SIZE = (40, 53)  # H×W, not multiples of 16


def tiny_config(**sections: Any) -> Config:
    """VOC classes, tiny ViT (random, seed 0), decoder on blocks 1–2, small decoder and PAR, CAA / RFM over the last
    3 / 2 maps, inference at long side 64 with 2 CRF workers."""
    return Config().replace(
        model={"name": "tiny-vit", "pretrained": None, "init_seed": 0},
        extract={"feature_layers": [1, 2], "attn_layers": [1, 2, 3]},
        refine={"static_layers": 3, "rfm_layers": 2},
        par={"num_iter": 3, "dilations": [1, 2]},
        decoder={"embed_dim": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        eval={"long_side": 64, "crf_workers": 2},
    ).replace(**sections)


def make_world(root: Path, images: dict[str, list[int]] = IMAGES) -> Path:
    """A VOC tree (JPEGs, SegmentationClassAug masks with a 255 border) and its manifest; returns the manifest."""
    fk.make_voc(root / "voc", {k: (v, []) for k, v in images.items()}, split="val", size=SIZE)
    return manifest_stage.run("voc", root / "voc", root / "val.parquet", split="val", progress=False).manifest_path


def make_checkpoint(path: Path, cfg: Config, manifest: Path, seed: int = 0, **overrides: Any) -> Path:
    """A checkpoint of a random decoder for cfg's backbone, as `weclip train` writes it (overrides replace
    save_checkpoint arguments, e.g. classes or fingerprint)."""
    backbone = load_backbone(cfg.model, "cpu", (TINY_CONFIG,))
    data = read_manifest(manifest)
    classes = manifest_class_set(data, cfg.text)
    names, rows = classes.classes, data.rows
    fingerprint = fingerprint_from_config(cfg, grid=(20, 20), prompts=classes.prompts(cfg.text.template),
                                          class_names=names,
                                          manifest=[(r.image_id, r.labels) for r in rows],
                                          checkpoint=backbone.identity)
    torch.manual_seed(seed)
    decoder = WeCLIPDecoder(len(cfg.extract.feature_layers), backbone.width, len(names) + 1, cfg.decoder)
    optimizer = build_optimizer(decoder.parameters(), cfg.train)
    kwargs = dict(decoder=decoder, optimizer=optimizer, scheduler=PolyWarmup(optimizer, cfg.train), step=7,
                  config=cfg, fingerprint=fingerprint, classes=classes, rng_state={"torch": torch.get_rng_state()})
    return save_checkpoint(path, **{**kwargs, **overrides})
