"""Typed configuration: every default of the project lives here, once.

Defaults follow the authors' released code (docs/algorithm.md); where the paper differs,
the paper's variant is an option and the docstring of the field says so. Presets (`voc`, `coco`,
`shapes`) are data: a dict of overrides per section, applied by `preset(name)`.

Every field is checked against its annotation whenever a config is made (defaults, presets, checkpoints,
`replace`, `--set`): its type, its Literal choices and the range or structural `Rule`s attached with `Annotated`
(`PosInt`, `Fraction`, `Blocks`, ...). A bad value is a ConfigError naming the dotted field, the value and what
is allowed, so it fails at start-up rather than when a stage first reads it (RFM's filter: step 15,000 on VOC).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, TypeVar

import yaml

from weclip.pipeline.errors import ConfigError, DataError, MissingFile, StorageError

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # 0..255 scale, WeCLIP transforms
IMAGENET_STD = (58.395, 57.12, 57.375)
CLIP_MEAN = tuple(255.0 * v for v in (0.48145466, 0.4578275, 0.40821073))  # CLIP-ES
CLIP_STD = tuple(255.0 * v for v in (0.26862954, 0.26130258, 0.27577711))
IGNORE_INDEX = 255
CAFFE_BGR_MEAN = (104.008, 116.669, 122.675)  # CLIP-ES CRF image quirk (eval_cam_with_crf.py, docs/algorithm.md §5.3)


@dataclass(frozen=True)
class Rule:
    """A fact a field's value must hold, attached to its annotation (`Annotated[int, at_least(1)]`), so that the
    range of a field is read where the field is declared; `says` completes the error "... must be <says>"."""
    holds: Callable[[Any], bool]
    says: str


def at_least(low: float) -> Rule:
    return Rule(lambda x: x >= low, f">= {low}")


def above(low: float) -> Rule:
    return Rule(lambda x: x > low, f"> {low}")


def within(low: float, high: float, *, high_open: bool = False) -> Rule:
    """[low, high], or [low, high) with `high_open` (Adam's betas must stay below 1)."""
    if high_open:
        return Rule(lambda x: low <= x < high, f"in [{low}, {high})")
    return Rule(lambda x: low <= x <= high, f"in [{low}, {high}]")


PosInt = Annotated[int, at_least(1)]  # a count or size: at least one
NonNegInt = Annotated[int, at_least(0)]  # a seed, an iteration number, a retry or worker count (0 = in process)
PosFloat = Annotated[float, above(0)]
NonNegFloat = Annotated[float, at_least(0)]  # a weight or resource amount where 0 switches the thing off
Fraction = Annotated[float, within(0, 1)]  # a probability or a threshold on scores in [0, 1]
Beta = Annotated[float, within(0, 1, high_open=True)]  # an Adam moment decay
NON_EMPTY = Rule(lambda t: len(t) > 0, "non-empty")
ASCENDING = Rule(lambda t: all(a < b for a, b in zip(t, t[1:])), "distinct and ascending")
LOW_HIGH = Rule(lambda t: t[0] <= t[1], "(low, high) with low <= high")
Blocks = Annotated[tuple[PosInt, ...], NON_EMPTY, ASCENDING]  # 1-based transformer block numbers


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field annotations as objects (this module's `from __future__ import annotations` leaves them strings)."""
    return typing.get_type_hints(cls, include_extras=True)


def _check(value: Any, hint: Any, path: str) -> Any:
    """`value` as a field annotated `hint` stores it (list -> tuple, int -> float), or ConfigError naming `path`."""
    rules: tuple[Rule, ...] = ()
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rules = tuple(extras)
    stored = _check_type(value, hint, path)
    for rule in rules:
        if not rule.holds(stored):
            raise ConfigError(f"{path} = {value!r} must be {rule.says}")
    return stored


def _is_number(value: Any) -> bool:
    """A finite int or float; bool is an int to Python, but `true` for a number is a slip, so it is refused."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# scalar annotation -> (accepts the value, what the error says it must be); `annotation(value)` is stored
_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: _is_number(v) and isinstance(v, numbers.Integral), "an int"),
    float: (_is_number, "a finite number"),  # an int is accepted and stored as the float
    str: (lambda v: isinstance(v, str), "a string"),
}


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (arm,) = [a for a in args if a is not type(None)]  # only `X | None` is used
        if value is None:
            return None
        try:
            return _check(value, arm, path)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (or null)") from None
    if origin is Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise ConfigError(f"{path} = {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is tuple:
        return _check_tuple(value, args, path)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"{path} = {value!r} must be a {hint.__name__} (give a dict of its fields)")
        return value
    if hint not in _SCALARS:
        raise TypeError(f"config field {path} has an annotation the checks do not know: {hint!r}")
    accepts, kind = _SCALARS[hint]
    if not accepts(value):
        raise ConfigError(f"{path} = {value!r} must be {kind}")
    return hint(value)


def _check_tuple(value: Any, args: tuple[Any, ...], path: str) -> tuple[Any, ...]:
    """`tuple[X, ...]` (any length) or `tuple[X, Y]` (that length); a JSON list is accepted as the tuple."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path} = {value!r} must be a list")
    items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
    if len(items) != len(value):
        raise ConfigError(f"{path} = {value!r} must have {len(items)} items")
    return tuple(_check(v, h, f"{path}[{i}]") for i, (v, h) in enumerate(zip(value, items)))


class Section:
    """Base of the config dataclasses: each field is checked against its annotation when an instance is made
    (defaults, presets, checkpoints, `replace`), so a bad value fails at start-up, not when the code first reads it.
    Errors of a direct construction name `Class.field`; `apply_overrides` names the dotted path."""

    def __post_init__(self) -> None:
        cls = type(self)
        for name, hint in _hints(cls).items():
            object.__setattr__(self, name, _check(getattr(self, name), hint, f"{cls.__name__}.{name}"))


@dataclass(frozen=True)
class ModelConfig(Section):
    """Frozen open_clip ViT. `pretrained` is an open_clip tag (e.g. 'openai') or a local checkpoint path."""
    name: str = "ViT-B-16-quickgelu"
    pretrained: str | None = "openai"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    normalisation: Literal["imagenet", "clip"] = "imagenet"  # WeCLIP code: ImageNet; CLIP-ES: CLIP stats
    init_seed: NonNegInt = 0  # torch seed of a random init (pretrained=None): every extract worker builds the same weights


SharpnessSoftmax = Literal["cam", "all", "labels"]


@dataclass(frozen=True)
class TextConfig(Section):
    template: str = "a clean origami {}."  # [PW] supplement writes "a clear origami"; code says "clean"
    # The built-in dataset this preset's constants are tuned for. Class names come from the manifest (and the cache,
    # and the checkpoint): a manifest of another built-in dataset is refused, a custom class list fits any preset.
    classes: Literal["voc", "coco", "shapes"] = "voc"
    # Background prompt names replacing the class set's own (VOC's for a custom class list); None keeps them.
    background: tuple[str, ...] | None = None
    # `weclip prompts`: what the softmax of CLIP-ES's sharpness ([PC] Eq. 5) runs over (docs/algorithm.md §3.4):
    # cam = the image's classes + background prompts, the scores its Grad-CAM differentiates; all = every class +
    # background prompts ([PC] Eq. 3); labels = the image's classes only
    sharpness_softmax: SharpnessSoftmax = "cam"


@dataclass(frozen=True)
class AugConfig(Section):
    """One training view: random rescale, h-flip, crop with zero padding (docs/algorithm.md §7.1)."""
    crop: PosInt = 320
    scale_range: Annotated[tuple[PosFloat, PosFloat], LOW_HIGH] = (0.5, 2.0)
    flip_prob: Fraction = 0.5


@dataclass(frozen=True)
class ManifestConfig(Section):
    """Building a dataset manifest (docs/design.md §3.1, docs/algorithm.md §2); used by stages/manifest.py.

    Only the settings every format shares: each format's default split and label source live in its entry of
    pipeline/data/registry.py."""
    decode: Literal["full", "header"] = "full"  # full pixel decode catches truncated files; header = PIL verify
    decode_threads: PosInt = 8  # validation threads (PIL decodes outside the GIL)


@dataclass(frozen=True)
class RefineConfig(Section):
    """CAA (static) and RFM (dynamic) refinement, docs/algorithm.md §5.2 and §6.4."""
    sinkhorn_rounds: PosInt = 3
    box_threshold: Fraction = 0.4  # lambda: 0.4 VOC, 0.7 COCO
    box_mode: Literal["released", "fixed"] = "released"  # released: half-open box slice (last row/col never a source)
    static_layers: PosInt = 8  # CAA: mean of the last 8 attention maps (blocks 5..12)
    rfm_layers: PosInt = 6  # RFM: last 6 (VOC) / 10 (COCO) maps; paper N0=6 means 7 maps
    rfm_filter: Literal["signed", "abs"] = "signed"  # code: signed sum; paper Eq. 5: |A_f - A_s|
    rfm_start_iter: NonNegInt = 15000  # static CAA before this many training iterations (VOC 15k, COCO 40k)
    bg_power: PosFloat = 1.0  # bg = (1 - max fg)^p


@dataclass(frozen=True)
class ParConfig(Section):
    num_iter: NonNegInt = 20  # 0: PAR leaves the maps as they are
    dilations: Annotated[tuple[PosInt, ...], NON_EMPTY] = (1, 2, 4, 8, 12, 24)
    w1: PosFloat = 0.3
    w2: NonNegFloat = 0.01


@dataclass(frozen=True)
class ExtractConfig(Section):
    views: PosInt = 4
    seed: NonNegInt = 1
    samples_per_shard: PosInt = 64
    batch_size: PosInt = 8
    dtype: Literal["float16", "float32", "bfloat16"] = "float16"
    # How the decoder's features are stored (pipeline/cache/quantize.py, README "Cache storage"): "plain" = extract.dtype;
    # "fp8" = e4m3 with a float32 scale per token (2.6 % relative RMS error whatever a token's outliers; ×1.21 with
    # zstd:1); "int8" = per-token scale (0.8 % on random ViT-B/16 weights, but 4.7 % once 4 channels are ×50)
    features_storage: Literal["plain", "int8", "fp8"] = "fp8"
    features_compressor: str = "zstd:1"  # 8-bit codes: byte shuffle does nothing; zstd entropy-codes fp8's exponents
    # How attention rows are stored, each keeping its exact sum: "log8" = 16 codes per octave below the row's maximum
    # (×2.19 with zstd:1); "uint8" = linear in [0, row max] (×1.21); "plain" = extract.dtype
    attn_storage: Literal["plain", "uint8", "log8"] = "log8"
    attn_compressor: str = "zstd:1"
    compressor: str = "blosc-zstd:1"  # every other array: cams, cam_classes, image, valid
    feature_layers: Blocks = tuple(range(1, 12))  # 1-based blocks feeding the decoder (code: 1..11)
    # 1-based blocks whose attention is stored: CAA needs the last 8 (5..12), RFM the last 6 (VOC) / 10 (COCO)
    attn_layers: Blocks = tuple(range(5, 13))
    cpus_per_task: NonNegFloat = 1.0  # Ray: CPUs reserved per shard task (torch uses that many threads in it)
    gpus_per_task: NonNegFloat = 1.0  # Ray: GPUs per shard task when the cluster has GPUs (the task then runs on cuda)
    max_retries: NonNegInt = 3  # Ray: re-runs of a shard task whose worker died (idempotent shard writes, docs/design.md §3.3)
    # also store each view's ground-truth mask crop (`mask`, uint8, 255 = ignore and padding) for `weclip train
    # --supervised`; needs a manifest with a mask for every image
    store_masks: bool = False


@dataclass(frozen=True)
class DecoderConfig(Section):
    embed_dim: PosInt = 256
    layers: PosInt = 3
    heads: PosInt = 8
    mlp_dim: PosInt = 1024
    dropout: Fraction = 0.1


@dataclass(frozen=True)
class LossConfig(Section):
    seg: Literal["balanced", "plain"] = "balanced"  # code: mean of bg CE and fg CE; paper: plain CE
    aff: Literal["linear", "bce"] = "linear"  # code: AFA linear loss; paper Eq. 10: cross-entropy
    aff_radius: PosInt = 8
    aff_weight: NonNegFloat = 0.1


@dataclass(frozen=True)
class TrainConfig(Section):
    iterations: PosInt = 30000
    batch_size: PosInt = 4
    lr: PosFloat = 2e-3
    weight_decay: NonNegFloat = 0.01  # paper: 1e-3
    warmup_iters: NonNegInt = 50
    warmup_ratio: Fraction = 1e-6  # warm-up starts at lr * warmup_ratio (utils/optimizer.py, docs/algorithm.md §7.3)
    poly_power: NonNegFloat = 1.0  # 0: constant lr after the warm-up
    adam_betas: tuple[Beta, Beta] = (0.9, 0.999)
    adam_eps: PosFloat = 1e-8
    seed: NonNegInt = 1
    checkpoint_every: PosInt = 2000
    loader_workers: NonNegInt = 2  # DataLoader processes that read the cache (0 = in the training process)
    train_flip: bool = False  # extra h-flip at train time, applied consistently to every cached array
    views: PosInt | None = None  # train on views 0..views-1 of each cached image (None: all the cache holds)
    tensorboard: bool = False  # also log the step metrics to <run>/tensorboard/ (needs the `tensorboard` package)
    val_every: NonNegInt = 0  # validation mIoU on a val manifest every this many steps, best kept as best.pt (0: off)
    keep_checkpoints: NonNegInt = 0  # keep only the newest this many step_XXXXXX.pt (0: keep all)
    # fully supervised ([PW] §4.5, Tab. 7): plain CE against the cached GT mask crops (extract.store_masks), ignore
    # 255; no CAMs, RFM, PAR or affinity loss. Recorded in every checkpoint's config
    supervised: bool = False


@dataclass(frozen=True)
class CrfParams(Section):
    iterations: PosInt = 10
    gauss_sxy: PosFloat = 3.0
    gauss_compat: NonNegFloat = 3.0
    bilateral_sxy: PosFloat = 64.0
    bilateral_srgb: PosFloat = 5.0
    bilateral_compat: NonNegFloat = 4.0


WECLIP_CRF = CrfParams()  # WeCLIP inference (utils/dcrf.py)
CLIPES_CRF = CrfParams(iterations=10, gauss_sxy=1.0, gauss_compat=3.0,
                       bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_compat=4.0)  # CLIP-ES pseudo masks


@dataclass(frozen=True)
class EvalConfig(Section):
    long_side: PosInt = 512
    scales: Annotated[tuple[PosFloat, ...], NON_EMPTY] = (1.0, 0.75)
    flip: bool = True
    crf: bool = False  # released test scripts have CRF commented out; the paper's "w/ CRF" numbers need it
    crf_params: CrfParams = WECLIP_CRF
    # CLIP-ES CGL in code: CRF posterior max < 0.95 -> 255 (a value above 1 ignores every pixel)
    clipes_confidence: NonNegFloat = 0.95
    clipes_crf_params: CrfParams = CLIPES_CRF  # DenseCRF of CLIP-ES pseudo masks (eval_cam_with_crf.py, §5.3)
    # CLIP-ES input statistics (§5.1: CLIP's); "preset" = model.normalisation (the stats the backbone was trained on)
    clipes_normalisation: Literal["clip", "imagenet", "preset"] = "clip"
    # image the CLIP-ES bilateral term sees: "rgb" = the RGB uint8 image; "released" = the released script's
    # mean-subtracted BGR wrapped to uint8 (§0.1 item 12, pipeline/refinement/crf.py `clipes_crf_image`), an opt-in quirk
    clipes_crf_image: Literal["rgb", "released"] = "rgb"
    crf_workers: NonNegInt = 2  # DenseCRF worker processes (0 = in the main process)
    crf_retries: NonNegInt = 1  # re-runs of an image whose CRF worker raised or died, before the run fails naming it
    overlay_alpha: Fraction = 0.5  # weight of the label colours in `weclip infer --overlay` images


@dataclass(frozen=True)
class DemoConfig(Section):
    """`weclip demo`: the embedded shapes world end to end (docs/design.md §5). `quick` is the CI-sized run."""
    train_images: PosInt = 400
    val_images: PosInt = 100
    seed: NonNegInt = 7
    quick_train_images: PosInt = 24
    quick_val_images: PosInt = 8
    quick_iterations: PosInt = 20


@dataclass(frozen=True)
class Config(Section):
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
        return apply_overrides(cls(), data)


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
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
    return Config.from_dict(overrides)


def apply_overrides(cfg: Any, overrides: Mapping[str, Any], prefix: str = "") -> Any:
    """Recursively replace dataclass fields, each value checked under its dotted name (`eval.crf_params.iterations`,
    which a `Section` built on its own cannot know); lists become tuples where the field is a tuple."""
    changes: dict[str, Any] = {}
    hints = _hints(type(cfg))
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key not in hints:
            where = prefix.rstrip(".") or "the config"
            raise ConfigError(f"{path!r} is not a config field; {where} has {', '.join(sorted(hints))}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = apply_overrides(current, value, f"{path}.")
        else:
            changes[key] = _check(value, hints[key], path)
    return dataclasses.replace(cfg, **changes)


def set_field(cfg: Config, dotted: str, value: Any) -> Config:
    """`cfg` with the one field named by its dotted path (`train.iterations`, `eval.crf_params.iterations`) set:
    what `weclip --set` does, so that a nested section is reached the same way as a top-level one."""
    section, *names = dotted.split(".")
    if not names:
        raise ConfigError(f"{dotted!r} names no section; write section.field, e.g. train.iterations")
    for name in reversed(names):
        value = {name: value}
    return apply_overrides(cfg, {section: value})


@dataclass(frozen=True)
class ManifestSettings(Section):
    """`weclip manifest`'s settings as a config file and `--set` name them (`manifest.decode=header`): the one section
    the training `Config` does not hold, so that one file can configure every command."""
    manifest: ManifestConfig = field(default_factory=ManifestConfig)


Settings = TypeVar("Settings", Config, ManifestSettings)
FILE_SECTIONS: tuple[str, ...] = tuple(sorted({*_hints(Config), *_hints(ManifestSettings)}))


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` (no dot) as a string; a config file means the number, as JSON and `--set` do."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_config_file(path: str | Path) -> dict[str, dict[str, Any]]:
    """The sections of a YAML (.yaml, .yml) or JSON (.json) config file, e.g. `train: {iterations: 1000}`; the values
    are checked when laid over a config (`apply_config_file`). An empty file has no sections."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise DataError(f"config file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MissingFile(f"config file {path} does not exist; check the --config path") from None
    except (OSError, UnicodeDecodeError) as err:
        raise StorageError(f"cannot read config file {path}: {err}") from None
    try:
        data = json.loads(text) if suffix == ".json" else yaml.load(text, Loader=_YamlLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise DataError(f"config file {path} is not valid {suffix.lstrip('.').upper()}: "
                        f"{' '.join(str(err).split())}") from None
    data = {} if data is None else data
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise DataError(f"config file {path} must map section names to fields, e.g. "
                        "{\"train\": {\"iterations\": 1000}}")
    unknown = sorted(set(data) - set(FILE_SECTIONS))
    if unknown:
        raise ConfigError(f"config file {path}: {unknown[0]!r} is not a config section; the sections are "
                          f"{', '.join(FILE_SECTIONS)}")
    return data


def apply_config_file(cfg: Settings, path: str | Path) -> Settings:
    """`cfg` with the sections of the config file at `path` that it holds laid over it (a `Config` skips the
    `manifest` section, `ManifestSettings` all the others); a bad field is a ConfigError naming the file."""
    mine = {k: v for k, v in load_config_file(path).items() if k in _hints(type(cfg))}
    try:
        return apply_overrides(cfg, mine)
    except ConfigError as err:
        raise ConfigError(f"config file {path}: {err}") from None


def dump_config(sections: Mapping[str, Any], fmt: Literal["yaml", "json"] = "yaml") -> str:
    """Sections (`Config.to_dict()`, ...) as the text of a config file `load_config_file` reads back."""
    plain = json.loads(json.dumps(sections))  # tuples as lists
    return yaml.safe_dump(plain, sort_keys=False) if fmt == "yaml" else json.dumps(plain, indent=2) + "\n"


def leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted name → value of every leaf of a nested config dict."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
