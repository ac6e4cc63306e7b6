"""Training checkpoints (docs/design.md §3.4): decoder, optimizer and schedule state, step, config, cache fingerprint,
class set and RNG states, in one file written atomically.

The file is a `torch.save`d dict of plain data and tensors only (read back with `weights_only=True`, so loading a
checkpoint never runs pickled code), tagged with `format` = "weclip-checkpoint" and a `version`. The decoder's
constructor arguments are stored next to its state dict, so evaluation rebuilds it from the file alone
(`build_decoder_from_checkpoint`).

`weclip export` writes the weights-only form (`save_weights`): a safetensors file of the decoder tensors whose
metadata holds what inference needs (format "weclip-weights", version, step, decoder arguments, config, fingerprint,
class set; JSON strings), with neither optimizer nor RNG state. `load_checkpoint` reads both forms, told apart by
their bytes (a safetensors file starts with its header length and a JSON object, a torch file is a zip archive), so
`evaluate` / `infer` / `pseudo` take either; a weights-only file cannot resume a run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weclip.pipeline.config import Config
from weclip.pipeline.errors import CheckpointError
from weclip.pipeline.files import atomic_write
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.model.text import ClassSet

FORMAT_TAG = "weclip-checkpoint"
FORMAT_VERSION = 2  # 2: the class set the CAMs were prompted with replaces the bare class names
WEIGHTS_TAG = "weclip-weights"
WEIGHTS_VERSION = 2
_WEIGHTS_KEYS = ("format", "version", "step", "decoder_args", "config", "fingerprint", "class_set")
_KEYS = ("format", "version", "step", "decoder", "decoder_args", "optimizer", "scheduler", "config", "fingerprint",
         "class_set", "rng_state")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back. `decoder_args` = WeCLIPDecoder's (in_layers, in_dim, num_classes) as a dict;
    `classes` is the class set of the data (its names in class id order; the decoder has len + 1 outputs, 0 =
    background), with the prompts the CAMs used; `rng_state` maps a generator name ("torch", "cuda") to its saved
    state. A weights-only export has empty optimizer, scheduler and RNG states and `weights_only` set."""
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
    weights_only: bool = False

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
    """Read a checkpoint written by `save_checkpoint` or a weights-only export of `save_weights`; CheckpointError
    (naming the file) when it is missing, truncated or corrupt, or not a weclip file of a version this code reads."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train first (`weclip train`) or give the path of "
                              "a checkpoint.pt / step_XXXXXX.pt written by it")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[8:9] == b"{":
        return _load_weights(path, map_location)
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, pickle and unpickler errors come in many types for a damaged file
        raise CheckpointError(f"cannot read checkpoint {path} ({type(exc).__name__}: {exc}); the file is truncated, "
                              "corrupt or not a weclip checkpoint. Use another step_XXXXXX.pt from the same "
                              "run or train again") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path} is not a weclip training checkpoint (no '{FORMAT_TAG}' format tag); "
                              "give a file written by `weclip train`")
    _check_version(path, data, FORMAT_VERSION)
    _check_keys(path, data, _KEYS)
    return Checkpoint(path=path, step=int(data["step"]), decoder_state=data["decoder"],
                      decoder_args={k: int(v) for k, v in data["decoder_args"].items()},
                      optimizer_state=data["optimizer"], scheduler_state=data["scheduler"],
                      config=_config(path, data["config"]), fingerprint=data["fingerprint"],
                      classes=ClassSet.from_dict(data["class_set"]), rng_state=data["rng_state"])


def save_weights(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write the weights-only form of a checkpoint (decoder tensors + the metadata inference reads), atomically."""
    metadata = {"format": WEIGHTS_TAG, "version": str(WEIGHTS_VERSION), "step": str(ckpt.step),
                "decoder_args": json.dumps(ckpt.decoder_args), "config": json.dumps(ckpt.config.to_dict()),
                "fingerprint": json.dumps(ckpt.fingerprint), "class_set": json.dumps(ckpt.classes.to_dict())}
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.decoder_state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)


def _load_weights(path: Path, map_location: str | torch.device) -> Checkpoint:
    """A weights-only export read back as a Checkpoint without optimizer, scheduler and RNG state."""
    try:
        with safe_open(str(path), framework="pt", device=str(torch.device(map_location))) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header or body
        raise CheckpointError(f"cannot read weights file {path} ({type(exc).__name__}: {exc}); the file is "
                              "truncated or corrupt. Export it again with `weclip export`") from exc
    if meta.get("format") != WEIGHTS_TAG:
        raise CheckpointError(f"{path} is a safetensors file but not a weclip weights export (no '{WEIGHTS_TAG}' "
                              "format tag); give a file written by `weclip export` or `weclip train`")
    _check_version(path, meta, str(WEIGHTS_VERSION))  # metadata values are strings
    _check_keys(path, meta, _WEIGHTS_KEYS)
    args = json.loads(meta["decoder_args"])
    return Checkpoint(path=path, step=int(meta["step"]), decoder_state=tensors,
                      decoder_args={k: int(v) for k, v in args.items()}, optimizer_state={}, scheduler_state={},
                      config=_config(path, json.loads(meta["config"])), fingerprint=json.loads(meta["fingerprint"]),
                      classes=ClassSet.from_dict(json.loads(meta["class_set"])), rng_state={}, weights_only=True)


def _check_version(path: Path, data: dict[str, Any], version: int | str) -> None:
    if data.get("version") != version:
        raise CheckpointError(f"checkpoint {path} has format version {data.get('version')}; this code reads "
                              f"version {version}. Use the weclip version that wrote it")


def _check_keys(path: Path, data: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}; it is damaged, train again")


def _config(path: Path, raw: dict[str, Any]) -> Config:
    try:
        return Config.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} holds a config this code cannot read ({exc}); use the weclip "
                              "version that wrote it") from exc


def build_decoder_from_checkpoint(ckpt: Checkpoint) -> WeCLIPDecoder:
    """The trained decoder of a checkpoint, weights loaded (strict), in eval mode, on the CPU."""
    decoder = WeCLIPDecoder(cfg=ckpt.config.decoder, **ckpt.decoder_args)
    try:
        decoder.load_state_dict({k: v.cpu() for k, v in ckpt.decoder_state.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"decoder weights of {ckpt.path} do not fit its recorded architecture: {exc}") from exc
    return decoder.eval()
