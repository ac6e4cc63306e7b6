"""Training checkpoints (docs/design.md §3.4): decoder, optimizer and schedule state, step, config, cache fingerprint,
class names and RNG states, in one file written atomically.

The file is a `torch.save`d dict of plain data and tensors only (read back with `weights_only=True`, so loading a
checkpoint never runs pickled code), tagged with `format` = "weclip-checkpoint" and a `version`. The decoder's
constructor arguments are stored next to its state dict, so evaluation rebuilds it from the file alone
(`build_decoder_from_checkpoint`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.errors import CheckpointError
from pipeline.files import atomic_write
from pipeline.model.decoder import WeCLIPDecoder
from pipeline.model.text import ClassSet

FORMAT_TAG = "weclip-checkpoint"
FORMAT_VERSION = 2  # 2: the class set the CAMs were prompted with replaces the bare class names
_KEYS = ("format", "version", "step", "decoder", "decoder_args", "optimizer", "scheduler", "config", "fingerprint",
         "class_set", "rng_state")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back. `decoder_args` = WeCLIPDecoder's (in_layers, in_dim, num_classes) as a dict;
    `classes` is the class set of the data (its names in class id order; the decoder has len + 1 outputs, 0 =
    background), with the prompts the CAMs used; `rng_state` maps a generator name ("torch", "cuda") to its saved state."""
    path: Path
    step: int
    decoder_state: dict[str, torch.Tensor]
    decoder_args: dict[str, int]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    config: Config
    fingerprint: dict[str, Any]
    classes: ClassSet
    rng_state: dict[str, Any]

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classes.classes


def decoder_args(decoder: WeCLIPDecoder) -> dict[str, int]:
    """The constructor arguments that, with `config.decoder`, rebuild `decoder`'s architecture."""
    return {"in_layers": decoder.in_layers, "in_dim": decoder.in_dim, "num_classes": decoder.head.out_channels}


def save_checkpoint(path: str | Path, *, decoder: WeCLIPDecoder, optimizer: torch.optim.Optimizer, scheduler: Any,
                    step: int, config: Config, fingerprint: dict[str, Any], classes: ClassSet,
                    rng_state: dict[str, Any]) -> Path:
    """Write a checkpoint atomically: a temp file in the same folder, flushed to disk, then renamed over `path`.
    A crash leaves either the previous file or the new one, never a partial file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_TAG, "version": FORMAT_VERSION, "step": int(step),
        "decoder": {k: v.detach().cpu() for k, v in decoder.state_dict().items()},
        "decoder_args": decoder_args(decoder),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "config": config.to_dict(), "fingerprint": dict(fingerprint), "class_set": classes.to_dict(),
        "rng_state": rng_state,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), fsync=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by `save_checkpoint`; CheckpointError (naming the file) when it is missing,
    truncated or corrupt, or not a weclip training checkpoint of a version this code reads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first (`weclip train`) or give the path of "
                              "a checkpoint.pt / step_XXXXXX.pt written by it")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and unpickler errors come in many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is truncated, "
                              "corrupt or not a weclip checkpoint. Use another step_XXXXXX.pt from the same "
                              "run or train again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a weclip training checkpoint (no '{FORMAT_TAG}' format tag); "
                              "give a file written by `weclip train`")
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {data.get('version')}; this code reads "
                              f"version {FORMAT_VERSION}. Use the weclip version that wrote it")
    missing = [k for k in _KEYS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is damaged, train again")
    try:
        config = Config.from_dict(data["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} holds a config this code cannot read ({exc}); use the weclip "
                              "version that wrote it") from exc
    return Checkpoint(path=path, step=int(data["step"]), decoder_state=data["decoder"],
                      decoder_args={k: int(v) for k, v in data["decoder_args"].items()},
                      optimizer_state=data["optimizer"], scheduler_state=data["scheduler"], config=config,
                      fingerprint=data["fingerprint"], classes=ClassSet.from_dict(data["class_set"]),
                      rng_state=data["rng_state"])


def build_decoder_from_checkpoint(ckpt: Checkpoint) -> WeCLIPDecoder:
    """The trained decoder of a checkpoint, weights loaded (strict), in eval mode, on the CPU."""
    decoder = WeCLIPDecoder(cfg=ckpt.config.decoder, **ckpt.decoder_args)
    try:
        decoder.load_state_dict({k: v.cpu() for k, v in ckpt.decoder_state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"decoder weights of {ckpt.path} do not fit its recorded architecture: {exc}") from exc
    return decoder.eval()
