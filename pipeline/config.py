"""Typed configuration: every default of the project lives here, once.

Defaults follow the authors' released code (see ../shared/ALGORITHM.md); where the paper differs,
the paper's variant is an option and the docstring of the field says so. Presets (`voc`, `coco`,
`shapes`) are data: a dict of overrides per section, applied by `preset(name)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0..255 scale, WeCLIP transforms
IMAGENET_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = tuple(255.0 * v for v in (0.48145466, 0.4578275, 0.40821073))  # CLIP-ES
CLIP_STD = tuple(255.0 * v for v in (0.26862954, 0.26130258, 0.27577711))
IGNORE_INDEX = 255
CAFFE_BGR_MEAN = (104.008, 116.669, 122.675)  # CLIP-ES CRF image quirk (eval_cam_with_crf.py, ALGORITHM.md §5.3)


@dataclass(frozen=True)
class ModelConfig:
    """Frozen open_clip ViT. `pretrained` is an open_clip tag (e.g. 'openai') or a local checkpoint path."""
    name: str = "ViT-B-16-quickgelu"
    pretrained: str | None = "openai"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    normalisation: Literal["imagenet", "clip"] = "imagenet"  # WeCLIP code: ImageNet; CLIP-ES: CLIP stats
    init_seed: int = 0  # torch seed of a random init (pretrained=None): every extract worker builds the same weights


@dataclass(frozen=True)
class TextConfig:
    template: str = "a clean origami {}."  # [PW] supplement writes "a clear origami"; code says "clean"
    classes: Literal["voc", "coco", "shapes"] = "voc"  # which class-name and background lists of pipeline/model/text.py


@dataclass(frozen=True)
class AugConfig:
    """One training view: random rescale, h-flip, crop with zero padding (ALGORITHM.md §7.1)."""
    crop: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip_prob: float = 0.5


@dataclass(frozen=True)
class ManifestConfig:
    """Building a dataset manifest (DESIGN.md §3.1, ALGORITHM.md §2); used by stages/manifest.py.

    Only the settings every format shares: each format's default split and label source live in its entry of
    pipeline/data/registry.py."""
    decode: Literal["full", "header"] = "full"  # full pixel decode catches truncated files; header = PIL verify
    decode_threads: int = 8  # validation threads (PIL decodes outside the GIL)


@dataclass(frozen=True)
class RefineConfig:
    """CAA (static) and RFM (dynamic) refinement, ALGORITHM.md §5.2 and §6.4."""
    sinkhorn_rounds: int = 3
    box_threshold: float = 0.4  # lambda: 0.4 VOC, 0.7 COCO
    box_mode: Literal["released", "fixed"] = "released"  # released: half-open box slice (last row/col never a source)
    static_layers: int = 8  # CAA: mean of the last 8 attention maps (blocks 5..12)
    rfm_layers: int = 6  # RFM: last 6 (VOC) / 10 (COCO) maps; paper N0=6 means 7 maps
    rfm_filter: Literal["signed", "abs"] = "signed"  # code: signed sum; paper Eq. 5: |A_f - A_s|
    rfm_start_iter: int = 15000  # static CAA before this many training iterations (VOC 15k, COCO 40k)
    bg_power: float = 1.0  # bg = (1 - max fg)^p


@dataclass(frozen=True)
class ParConfig:
    num_iter: int = 20
    dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)
    w1: float = 0.3
    w2: float = 0.01


@dataclass(frozen=True)
class ExtractConfig:
    views: int = 4
    seed: int = 1
    samples_per_shard: int = 64
    batch_size: int = 8
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    compressor: str = "blosc-zstd:1"  # smallest at >100 MB/s write (benchmarks/results/cache_codecs.json)
    feature_layers: tuple[int, ...] = tuple(range(1, 12))  # 1-based blocks feeding the decoder (code: 1..11)
    # 1-based blocks whose attention is stored: CAA needs the last 8 (5..12), RFM the last 6 (VOC) / 10 (COCO)
    attn_layers: tuple[int, ...] = tuple(range(5, 13))
    cpus_per_task: float = 1.0  # Ray: CPUs reserved per shard task (torch uses that many threads in it)
    gpus_per_task: float = 1.0  # Ray: GPUs per shard task when the cluster has GPUs (the task then runs on cuda)
    max_retries: int = 3  # Ray: re-runs of a shard task whose worker died (idempotent shard writes, DESIGN.md §3.3)


@dataclass(frozen=True)
class DecoderConfig:
    embed_dim: int = 256
    layers: int = 3
    heads: int = 8
    mlp_dim: int = 1024
    dropout: float = 0.1


@dataclass(frozen=True)
class LossConfig:
    seg: Literal["balanced", "plain"] = "balanced"  # code: mean of bg CE and fg CE; paper: plain CE
    aff: Literal["linear", "bce"] = "linear"  # code: AFA linear loss; paper Eq. 10: cross-entropy
    aff_radius: int = 8
    aff_weight: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    iterations: int = 30000
    batch_size: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.01  # paper: 1e-3
    warmup_iters: int = 50
    warmup_ratio: float = 1e-6  # warm-up starts at lr * warmup_ratio (utils/optimizer.py, ALGORITHM.md §7.3)
    poly_power: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 1
    checkpoint_every: int = 2000
    loader_workers: int = 2  # DataLoader processes that read the cache (0 = in the training process)
    train_flip: bool = False  # extra h-flip at train time, applied consistently to every cached array
    views: int | None = None  # train on views 0..views-1 of each cached image (None: all the cache holds)


@dataclass(frozen=True)
class CrfParams:
    iterations: int = 10
    gauss_sxy: float = 3.0
    gauss_compat: float = 3.0
    bilateral_sxy: float = 64.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 4.0


WECLIP_CRF = CrfParams()  # WeCLIP inference (utils/dcrf.py)
CLIPES_CRF = CrfParams(iterations=10, gauss_sxy=1.0, gauss_compat=3.0,
                       bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)  # CLIP-ES pseudo masks


@dataclass(frozen=True)
class EvalConfig:
    long_side: int = 512
    scales: tuple[float, ...] = (1.0, 0.75)
    flip: bool = True
    crf: bool = False  # released test scripts have CRF commented out; the paper's "w/ CRF" numbers need it
    crf_params: CrfParams = WECLIP_CRF
    clipes_confidence: float = 0.95  # CLIP-ES CGL in code: CRF posterior max < 0.95 -> 255
    clipes_crf_params: CrfParams = CLIPES_CRF  # DenseCRF of CLIP-ES pseudo masks (eval_cam_with_crf.py, §5.3)
    # CLIP-ES input statistics (§5.1: CLIP's); "preset" = model.normalisation (the stats the backbone was trained on)
    clipes_normalisation: Literal["clip", "imagenet", "preset"] = "clip"
    # image the CLIP-ES bilateral term sees: "rgb" = the RGB uint8 image; "released" = the released script's
    # mean-subtracted BGR wrapped to uint8 (§0.1 item 12, pipeline/refinement/crf.py `clipes_crf_image`), an opt-in quirk
    clipes_crf_image: Literal["rgb", "released"] = "rgb"
    crf_workers: int = 2  # DenseCRF worker processes (0 = in the main process)
    crf_retries: int = 1  # re-runs of an image whose CRF worker raised or died, before the run fails naming it
    overlay_alpha: float = 0.5  # weight of the label colours in `weclip infer --overlay` images


@dataclass(frozen=True)
class DemoConfig:
    """`weclip demo`: the embedded shapes world end to end (DESIGN.md §5). `quick` is the CI-sized run."""
    train_images: int = 400
    val_images: int = 100
    seed: int = 7
    quick_train_images: int = 24
    quick_val_images: int = 8
    quick_iterations: int = 20


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    par: ParConfig = field(default_factory=ParConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def replace(self, **sections: dict[str, Any]) -> "Config":
        """Return a copy with fields of named sections overridden: cfg.replace(train={"iterations": 10})."""
        return apply_overrides(self, sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        return apply_overrides(cls(), {k: v for k, v in data.items()})


# Presets are data: section -> field -> value. `voc` is the dataclass defaults.
PRESETS: dict[str, dict[str, Any]] = {
    "voc": {},
    "coco": {
        "text": {"classes": "coco"},
        "refine": {"box_threshold": 0.7, "rfm_layers": 10, "rfm_start_iter": 40000},
        "extract": {"attn_layers": list(range(3, 13))},
        "train": {"iterations": 80000, "checkpoint_every": 10000},
    },
    "shapes": {
        # the tiny CLIP trained on this world by stages/toy_clip.py (3 blocks, width 96), shipped with the package
        "model": {"name": "weclip-tiny",
                  "pretrained": str(Path(__file__).resolve().parent / "assets" / "weclip-tiny.pt")},
        "text": {"classes": "shapes", "template": "a photo of {}."},  # captions of pipeline/data/shapes.py use it
        "aug": {"crop": 224},
        # 3 blocks instead of 12: CAA averages the last 2 maps (VOC: 8 of 12), RFM chooses among the last 2 (VOC: 6)
        "refine": {"rfm_start_iter": 150, "static_layers": 2, "rfm_layers": 2},  # RFM for the second half
        "extract": {"views": 1, "samples_per_shard": 32,  # views: benchmarks/shapes_quality.py --train, README
                    "feature_layers": [1, 2], "attn_layers": [1, 2, 3]},  # blocks 1..n-1 (decoder) / 1..n (CAA, RFM)
        "train": {"iterations": 300, "checkpoint_every": 100, "loader_workers": 0},
        "eval": {"clipes_normalisation": "preset"},  # the tiny CLIP was trained on ImageNet-normalised images
    },
}


def preset(name: str) -> Config:
    try:
        overrides = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
    return Config.from_dict(overrides)


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Recursively replace dataclass fields; lists become tuples where the field is a tuple."""
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"{type(cfg).__name__} has no field {key!r}; fields: {sorted(names)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = apply_overrides(current, value)
        elif isinstance(current, tuple) and isinstance(value, list):
            changes[key] = tuple(value)
        else:
            changes[key] = value
    return dataclasses.replace(cfg, **changes)
