"""Stage `export`: a training checkpoint → its weights-only form, a safetensors file (`checkpoint.save_weights`).

The export keeps what inference reads — decoder tensors, decoder arguments, config, data fingerprint, class names,
step — and drops optimizer, schedule and RNG state, so it is the file to share or deploy; `weclip evaluate` /
`infer` / `pseudo` read it as they read the checkpoint, with the same results. It cannot resume training.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from weclip.pipeline.errors import CheckpointError
from weclip.pipeline.training.checkpoint import load_checkpoint, save_weights


@dataclass(frozen=True)
class ExportSummary:
    checkpoint: str
    out: str
    step: int
    tensors: int
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return (f"exported the decoder of {self.checkpoint} (step {self.step}): {self.tensors} tensors, "
                f"{self.bytes / 2**20:.2f} MiB → {self.out}")


def run(checkpoint: str | Path, out: str | Path) -> ExportSummary:
    """Write the weights-only export of `checkpoint` to `out` (atomically); refuses to overwrite the checkpoint."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.exists() and out.resolve() == checkpoint.resolve():
        raise CheckpointError(f"export output {out} is the checkpoint itself; give another path, e.g. "
                              "model.safetensors")
    ckpt = load_checkpoint(checkpoint)
    path = save_weights(out, ckpt)
    return ExportSummary(checkpoint=str(checkpoint), out=str(path), step=ckpt.step, tensors=len(ckpt.decoder_state),
                         bytes=path.stat().st_size)
