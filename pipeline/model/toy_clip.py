"""The tiny CLIP ('weclip-tiny') recipe: captions, loss, training loop with resume, float16 checkpoint (docs/design.md §5).

Nothing pretrained can be downloaded here, so the project trains its own small open_clip CLIP on image–caption pairs
of `pipeline/data/shapes.py`, contrastively, on a CPU, and ships it as a float16 state dict that
`open_clip.create_model('weclip-tiny', pretrained=PATH)` and `FrozenCLIP.load('weclip-tiny', PATH)` load
(`stages/toy_clip.py`, `weclip toy-clip`).

Choices (the architecture is `pipeline/model_configs/weclip-tiny.json`; the rest are `ToyClipRecipe` fields):
- Architecture: ViT width 96, patch 16, 224 px, QuickGELU, **3 blocks**; text tower width 64, 2 blocks, context 24,
  the standard 49,408-token vocabulary. Depth was chosen by CAM quality, not presence: every 6-block variant tried
  (CLS or patch-mean pooling, larger objects, logit scale 100, with or without patch dropout) reached presence mAP
  ≥ 0.99 but raw-CAM mIoU 16–39, because its patch tokens at the last block's input already carry the global
  summary (background patches end up more similar to the class prompt than the object's own patches), so
  Grad-CAM lights the background; with 3 blocks the tokens stay local and raw CAMs reach ~50.
- Input: the shapes preset's extraction input, i.e. ImageNet mean/std on the 0..255 scale (docs/algorithm.md §0.1 item 5,
  `pipeline.data.augment.normalise`), 224×224. The image embedding is open_clip's `pool_type='avg'` (ln_post on all
  tokens, mean of the patch tokens, proj): the pooling the CAM uses (docs/algorithm.md §3.2 step 5).
- Captions teach exactly the sentences the CAM scores (docs/algorithm.md §3.3): each image gets one caption drawn from
  four kinds — every object + background ("a photo of a ball and a star on grass."), a subset of its objects with
  or without the background, one object alone ("a photo of a ball.", the class prompt), the background alone
  ("a photo of grass.", a background prompt). Objects are named in random order.
- Targets: the standard symmetric InfoNCE of CLIP, except that a caption that is *true* of several images in the
  batch (every named object is in the image, and the named background if any) has all of them as positives,
  uniformly weighted (a batch of 32 holds ~5 images per class, so "a photo of a ball." is true of several). With
  one positive per row this is exactly CLIP's loss.
- Hard negatives (NegCLIP-style, text only): per image one extra caption with one named object replaced by a
  class absent from the image. They are extra columns of the image→text softmax; they have no image of their own.
- Patch dropout (FLIP): half of the patch tokens are dropped during most of training (about 2× cheaper per step);
  the last `unmasked_fraction` of the steps runs on all tokens, as at inference.
- One thread: on a CPU shared with other jobs, two OpenMP threads spent ~4× the CPU time per image.

Every batch is a pure function of (seed, step), so a stopped run resumes from its last state file bit for bit.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import PatchDropout
from torch import nn

from weclip.pipeline.config import preset
from weclip.pipeline.data import augment, shapes
from weclip.pipeline.errors import ConfigError, TrainError
from weclip.pipeline.files import atomic_write, sha256_file
from weclip.pipeline.metrics import multi_hot, presence_map
from weclip.pipeline.model.backbone import register_model_configs
from weclip.pipeline.model.text import class_set

MAX_CHECKPOINT_BYTES = 20 * 1024 * 1024  # the shipped checkpoint must stay small enough to live in the repository
@dataclass(frozen=True)
class ToyClipRecipe:
    """Everything that determines the shipped tiny CLIP. Defaults are the recipe of the shipped checkpoint."""
    model: str = "weclip-tiny"  # pipeline/model_configs/weclip-tiny.json
    seed: int = 0  # training world seed and torch seed
    image_size: int = 224
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices only (not biases, norms, embeddings, logit scale)
    init_temperature: float = 0.07  # CLIP's initial τ; logit scale = 1/τ, learned, capped at 100
    # probabilities of the caption kinds: (all objects + bg, object subset ± bg, one object, background only)
    caption_mix: tuple[float, float, float, float] = (0.3, 0.3, 0.25, 0.15)
    hard_negatives: bool = True
    flip_prob: float = 0.5
    patch_dropout: float = 0.5
    unmasked_fraction: float = 0.1
    val_seed: int = 1000  # held-out world for the presence mAP logged during training
    val_count: int = 200
    eval_every: int = 100
    save_every: int = 100
    threads: int = 1  # on a shared CPU, one thread wastes far less time in OpenMP barriers than two

    def __post_init__(self) -> None:
        if not 0 <= self.patch_dropout < 1:  # open_clip's PatchDropout would fail with a bare assertion mid-run
            raise ConfigError(f"patch_dropout {self.patch_dropout} is outside [0, 1); choose e.g. 0.5, or 0 for none")

    @property
    def template(self) -> str:
        return preset("shapes").text.template


# ----------------------------------------------------------------------------------------------------------
# Captions and targets (pure)


@dataclass(frozen=True)
class CaptionSpec:
    """What a caption names: objects in the order they are written, and a background (None: not named)."""
    objects: tuple[int, ...]
    background: int | None

    def text(self, template: str) -> str:
        return template.format(shapes.describe(self.objects, self.background))

    def true_of(self, labels: Sequence[int], background: int) -> bool:
        """A caption is true of an image that contains every object it names, on the background it names."""
        return set(self.objects) <= set(labels) and self.background in (None, background)


def sample_caption(rng: np.random.Generator, labels: Sequence[int], background: int,
                   mix: Sequence[float]) -> CaptionSpec:
    """One true caption of an image, of a kind drawn from `mix` (see the module docstring)."""
    kind = int(rng.choice(4, p=np.asarray(mix) / np.sum(mix)))
    order = tuple(int(c) for c in rng.permutation(list(labels)))
    if kind == 0:
        return CaptionSpec(order, background)
    if kind == 1:
        keep = int(rng.integers(1, len(order) + 1))
        return CaptionSpec(order[:keep], background if rng.random() < 0.5 else None)
    if kind == 2:
        return CaptionSpec(order[:1], None)
    return CaptionSpec((), background)


def hard_negative(rng: np.random.Generator, spec: CaptionSpec, labels: Sequence[int], background: int,
                  num_classes: int, num_backgrounds: int) -> CaptionSpec:
    """The caption with one named object replaced by a class absent from the image (or, for a background-only
    caption, another background)."""
    if not spec.objects:
        other = [b for b in range(num_backgrounds) if b != background]
        return CaptionSpec((), int(rng.choice(other)))
    absent = [c for c in range(num_classes) if c not in labels]
    objects = list(spec.objects)
    objects[int(rng.integers(len(objects)))] = int(rng.choice(absent))
    return CaptionSpec(tuple(objects), spec.background)


def truth_matrix(specs: Sequence[CaptionSpec], labels: Sequence[Sequence[int]],
                 backgrounds: Sequence[int]) -> torch.Tensor:
    """B×T bool: caption t is true of image b."""
    return torch.tensor([[s.true_of(lab, bg) for s in specs] for lab, bg in zip(labels, backgrounds)])


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
                     truth: torch.Tensor, paired: int) -> torch.Tensor:
    """Symmetric InfoNCE with every true pair a positive (uniform soft targets).

    image_emb B×E and text_emb T×E are L2-normalised; truth B×T; the first `paired` texts are the batch's own
    captions (each true of at least its own image) and take part in the text→image direction, the rest (hard
    negatives) only in image→text. With truth = identity this is CLIP's loss.
    """
    logits = logit_scale * image_emb @ text_emb.T
    target = truth.float()
    image_to_text = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    paired_target = target[:, :paired]
    text_to_image = -(paired_target / paired_target.sum(0, keepdim=True)
                      * logits[:, :paired].log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


# ----------------------------------------------------------------------------------------------------------
# Presence on a held-out world (model glue; the metric is `pipeline.metrics.presence_map`)


def normalise(images: torch.Tensor) -> torch.Tensor:
    """B×H×W×3 uint8 → B×3×H×W float, normalised exactly as the shapes preset's extraction normalises
    (`pipeline.data.augment.normalise` with `preset('shapes').model.normalisation`: ImageNet mean/std, 0..255 scale)."""
    return augment.normalise(images.permute(0, 3, 1, 2), preset("shapes").model.normalisation)


@torch.no_grad()
def presence_scores(model: nn.Module, tokenizer: Callable, images: torch.Tensor, template: str,
                    batch_size: int = 50) -> np.ndarray:
    """N×C cosine similarity of each image (B×H×W×3 uint8) with each class prompt of the shapes class set."""
    names = class_set("shapes")
    text = F.normalize(model.encode_text(tokenizer([template.format(n) for n in names.prompt_names])), dim=-1)
    rows = [F.normalize(model.encode_image(normalise(images[i:i + batch_size])), dim=-1) @ text.T
            for i in range(0, len(images), batch_size)]
    return torch.cat(rows).numpy()


def held_out(seed: int, count: int, size: int, template: str) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """A held-out world: (N×H×W×3 uint8 images, per-image labels)."""
    samples = list(shapes.iter_samples(seed, size, template, count=count))
    return torch.from_numpy(np.stack([s.image for s in samples])), [s.labels for s in samples]


@dataclass(frozen=True)
class Validation:
    """The recipe's held-out world, made once, scoring any model of the recipe (during training and as shipped)."""
    images: torch.Tensor
    truth: np.ndarray  # N×C multi-hot
    tokenizer: Callable
    template: str

    @classmethod
    def of(cls, recipe: ToyClipRecipe) -> "Validation":
        images, labels = held_out(recipe.val_seed, recipe.val_count, recipe.image_size, recipe.template)
        return cls(images, multi_hot(labels, class_set("shapes").num_classes), open_clip.get_tokenizer(recipe.model),
                   recipe.template)

    def presence_map(self, model: nn.Module) -> float:
        return presence_map(presence_scores(model, self.tokenizer, self.images, self.template), self.truth)


# ----------------------------------------------------------------------------------------------------------
# Training


class CaptionedBatches(torch.utils.data.IterableDataset):
    """Batches `start..end-1`; batch k holds world samples k·B … k·B+B−1 and is a pure function of (seed, k)."""

    def __init__(self, recipe: ToyClipRecipe, start: int, end: int) -> None:
        self.recipe, self.start, self.end = recipe, start, end

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        r = self.recipe
        tokenizer = open_clip.get_tokenizer(r.model)
        names = class_set("shapes")
        for step in range(self.start, self.end):
            rng = np.random.default_rng([r.seed, step, 1])
            batch = [shapes.sample(r.seed, step * r.batch_size + i, r.image_size, r.template)
                     for i in range(r.batch_size)]
            images = np.stack([s.image[:, ::-1] if rng.random() < r.flip_prob else s.image for s in batch])
            labels = [s.labels for s in batch]
            backgrounds = [s.background for s in batch]
            specs = [sample_caption(rng, s.labels, s.background, r.caption_mix) for s in batch]
            if r.hard_negatives:
                specs += [hard_negative(rng, spec, s.labels, s.background, names.num_classes, len(names.background))
                          for spec, s in zip(specs, batch)]
            yield (step, torch.from_numpy(images.copy()), tokenizer([s.text(r.template) for s in specs]),
                   truth_matrix(specs, labels, backgrounds))


def build_model(recipe: ToyClipRecipe) -> nn.Module:
    """The untrained architecture (logit scale initialised to 1/init_temperature)."""
    register_model_configs()
    torch.manual_seed(recipe.seed)
    model = open_clip.create_model(recipe.model, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / recipe.init_temperature))
    return model


def build_optimizer(model: nn.Module, recipe: ToyClipRecipe) -> torch.optim.Optimizer:
    """AdamW with CLIP's betas and eps; weight decay on the matrices only (not biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim >= 2 and "embedding" not in name
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98), eps=1e-6)


def learning_rate(recipe: ToyClipRecipe, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


def patch_dropout_at(recipe: ToyClipRecipe, step: int) -> float:
    """The patch-dropout probability of a step: the recipe's, except for the last `unmasked_fraction` of the steps."""
    unmasked_from = int(recipe.steps * (1 - recipe.unmasked_fraction))
    return recipe.patch_dropout if step < unmasked_from else 0.0


def set_patch_dropout(model: nn.Module, prob: float) -> None:
    """Swap the (parameter-free) patch-dropout module; the state dict is unchanged."""
    model.visual.patch_dropout = PatchDropout(prob) if prob > 0 else nn.Identity()


@dataclass
class TrainState:
    """Where a run stands: what `workdir/state.pt` holds besides the model and optimizer tensors."""
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # over all pieces of a resumed run


def load_state(path: Path, recipe: ToyClipRecipe, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model and optimizer from a state file of the same recipe."""
    state = torch.load(path, weights_only=False)
    if state["recipe"] != asdict(recipe):
        raise TrainError(f"{path} was written by another recipe; delete it or run without --resume")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return TrainState(state["step"], state["history"], state["seconds"])


def save_state(path: Path, recipe: ToyClipRecipe, model: nn.Module, optimizer: torch.optim.Optimizer,
               state: TrainState) -> None:
    """Write the full training state atomically and durably: a resume depends on it."""
    payload = {"recipe": asdict(recipe), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "step": state.step, "history": state.history, "seconds": state.seconds}
    atomic_write(path, lambda tmp: torch.save(payload, tmp), fsync=True)


@dataclass
class TrainResult:
    model: nn.Module  # eval mode, no patch dropout
    history: list[dict[str, float]]  # per evaluation: step, mean loss, presence mAP on the held-out world, …
    step: int  # steps done; < recipe.steps when stopped early by `stop_at`


def train(recipe: ToyClipRecipe, workdir: Path, resume: bool = False, stop_at: int | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train; every `save_every` steps the full state goes to `workdir/state.pt`. `resume` continues from it;
    `stop_at` ends the run after that step of the schedule (state saved), so a long recipe can run in pieces."""
    torch.set_num_threads(recipe.threads)
    workdir.mkdir(parents=True, exist_ok=True)
    state_path = workdir / "state.pt"
    model = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    state = TrainState()
    if resume and state_path.exists():
        state = load_state(state_path, recipe, model, optimizer)
        log(f"resumed at step {state.step}")
    start, history = state.step, state.history
    validation = Validation.of(recipe)
    end = recipe.steps if stop_at is None else min(stop_at, recipe.steps)
    loader = torch.utils.data.DataLoader(CaptionedBatches(recipe, start, end), batch_size=None, num_workers=1,
                                         prefetch_factor=2)
    model.train()
    tic, running = time.time() - state.seconds, []
    for step, images, tokens, truth in loader:
        torch.manual_seed(recipe.seed * 1_000_003 + step)  # patch dropout of step k is the same after a resume
        set_patch_dropout(model, patch_dropout_at(recipe, step))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        image_emb = F.normalize(model.encode_image(normalise(images)), dim=-1)
        text_emb = F.normalize(model.encode_text(tokens), dim=-1)
        loss = contrastive_loss(image_emb, text_emb, model.logit_scale.exp(), truth, recipe.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        running.append(loss.detach().item())
        done = step + 1
        if done % recipe.eval_every == 0 or done == recipe.steps:
            model.eval()
            score = validation.presence_map(model)
            model.train()
            history.append({"step": done, "loss": float(np.mean(running)), "presence_map": score,
                            "logit_scale": float(model.logit_scale.detach().exp()), "seconds": time.time() - tic})
            log(json.dumps(history[-1]))
            running = []
        if done % recipe.save_every == 0 or done == end:
            save_state(state_path, recipe, model, optimizer, TrainState(done, history, time.time() - tic))
    set_patch_dropout(model, 0.0)
    return TrainResult(model.eval(), history, max(start, end))


# ----------------------------------------------------------------------------------------------------------
# The shipped checkpoint


def save_fp16(model: nn.Module, path: Path) -> int:
    """Write the state dict in float16 (what `open_clip.create_model(..., pretrained=path)` reads); returns bytes."""
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise ConfigError(f"{path} is {size / 2**20:.1f} MiB, over the {MAX_CHECKPOINT_BYTES / 2**20:.0f} MiB limit; "
                          "make the model config (pipeline/model_configs/) smaller, e.g. the text width")
    return size


def load_fp16(model_name: str, path: Path) -> nn.Module:
    """The shipped checkpoint as open_clip loads it (float16 weights into the float32 model), in eval mode."""
    register_model_configs()
    return open_clip.create_model(model_name, pretrained=str(path)).eval()


def checkpoint_record(recipe: ToyClipRecipe, checkpoint: Path, history: list[dict[str, float]], presence: float,
                      command: str | None) -> dict[str, Any]:
    """What the `.json` next to a shipped checkpoint says: which file (by name and digest, no machine's path), how
    it was made (`command` None: no command line reproduces the recipe) and how good it is."""
    return {
        "model": recipe.model,
        "checkpoint": checkpoint.name,
        "bytes": checkpoint.stat().st_size,
        "sha256": sha256_file(checkpoint),
        "dtype": "float16",
        "normalisation": preset("shapes").model.normalisation,
        "template": recipe.template,
        "recipe": asdict(recipe),
        "command": command,
        "train_seconds": round(history[-1]["seconds"], 1),
        "history": history,
        "presence_map_fp16": presence,
        # CAM figures: `benchmarks/shapes_quality.py --record` fills this in for the checkpoint with this sha256
        "quality": {},
    }
