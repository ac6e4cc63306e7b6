"""`weclip toy-clip`: train the embedded tiny CLIP ('weclip-tiny') on the shapes world and ship it (docs/design.md §5).

The recipe and the reasons for it are `pipeline.model.toy_clip`. This stage trains it (resumable, in pieces with
`stop_at`), writes the float16 checkpoint and, next to it, its record: the recipe, the `weclip toy-clip` command
that rebuilds it and the presence mAP of the weights as shipped.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from weclip.pipeline.files import atomic_write_text, repo_relative
from weclip.pipeline.model.toy_clip import ToyClipRecipe, Validation, checkpoint_record, load_fp16, save_fp16, train

# Recipe fields settable from the command line (the rest are fixed by the recipe's defaults); `hard_negatives` is
# the flag --hard-negatives/--no-hard-negatives.
CLI_FIELDS = ("seed", "steps", "batch_size", "lr", "warmup_steps", "weight_decay", "patch_dropout",
              "unmasked_fraction", "val_count", "eval_every", "threads")
CLI_FLAGS = ("hard_negatives",)


def recipe_from(options: Mapping[str, Any]) -> ToyClipRecipe:
    """The recipe of command-line option values: the recipe fields among `options`, None meaning the default."""
    settable = CLI_FIELDS + CLI_FLAGS
    return ToyClipRecipe(**{k: v for k, v in options.items() if k in settable and v is not None})


def rebuild_command(recipe: ToyClipRecipe, out: Path) -> str | None:
    """The command line, run from the repository root, that retrains this recipe into `out`, every option spelled
    out; None when the recipe sets a field the command line cannot (then no command reproduces it)."""
    fixed = [f.name for f in fields(ToyClipRecipe) if f.name not in CLI_FIELDS + CLI_FLAGS]
    if any(getattr(recipe, name) != getattr(ToyClipRecipe(), name) for name in fixed):
        return None
    args = [f"--{name.replace('_', '-')}={getattr(recipe, name)}" for name in CLI_FIELDS]
    args += [f"--{'' if getattr(recipe, name) else 'no-'}{name.replace('_', '-')}" for name in CLI_FLAGS]
    return shlex.join(["weclip", "toy-clip", f"--out={repo_relative(out)}", *args])


@dataclass
class ToyClipSummary:
    """A run's end: the steps done and, once the recipe's last step is done, the shipped checkpoint and its record."""
    step: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None  # None: stopped early, only the training state was written
    record: Path | None = None
    bytes: int = 0
    presence_map: float | None = None  # of the float16 weights as shipped, on the recipe's held-out world

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k != "history"}

    def format(self) -> str:
        if self.checkpoint is None:
            return f"stopped after step {self.step} of {self.steps}; continue with --resume"
        return (f"tiny CLIP: {self.checkpoint} ({self.bytes / 2**20:.1f} MiB, presence mAP {self.presence_map:.4f}); "
                f"record {self.record}")


def run(recipe: ToyClipRecipe, out: Path, workdir: Path, resume: bool = False, stop_at: int | None = None,
        log: Callable[[str], None] = print) -> ToyClipSummary:
    """Train, save `out` (fp16 state dict) and `out.with_suffix('.json')`: recipe, rebuild command, measured quality.

    The presence mAP here is measured on the float16 weights as shipped, on the recipe's held-out world. When
    `stop_at` ends the run before the recipe's last step only the training state in `workdir` is written.
    """
    result = train(recipe, workdir, resume, stop_at, log)
    if result.step < recipe.steps:
        return ToyClipSummary(result.step, recipe.steps, result.history)
    size = save_fp16(result.model, out)
    score = Validation.of(recipe).presence_map(load_fp16(recipe.model, out))
    record = out.with_suffix(".json")
    atomic_write_text(record, json.dumps(checkpoint_record(recipe, out, result.history, score,
                                                           rebuild_command(recipe, out)), indent=2) + "\n")
    return ToyClipSummary(result.step, recipe.steps, result.history, out, record, size, score)
