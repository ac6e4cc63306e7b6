"""TensorBoard view of a training run (`train.tensorboard`): the step metrics of `metrics.jsonl` as scalars in
`<run>/tensorboard/`, so a researcher can watch the loss terms, learning rate, foreground fraction, the RFM switch
and the validation mIoU live. `metrics.jsonl` stays the record; the event files are a view of it.

The `tensorboard` package is optional (`pip install 'weclip[tensorboard]'`): it is imported only when asked for,
and a run that asks without it fails at start-up with a ConfigError naming the extra.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from weclip.pipeline.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
# metrics.jsonl key -> scalar tag; booleans are logged as 0/1
SCALAR_TAGS = {"loss": "loss/total", "seg": "loss/seg", "aff": "loss/aff", "lr": "train/lr",
               "fg_fraction": "train/fg_fraction", "rfm": "train/rfm", "val_miou": "val/miou"}


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The tagged scalars of one metrics line (keys it does not have are left out)."""
    return {tag: float(metrics[key]) for key, tag in SCALAR_TAGS.items() if metrics.get(key) is not None}


class TensorBoardLog:
    """A SummaryWriter on `<run>/tensorboard/`. `start` is the first step this process logs: events a killed run
    wrote at or past it are purged, as `metrics.jsonl` drops its lines past the resumed checkpoint."""

    def __init__(self, run_dir: Path, start: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError("train.tensorboard = true needs the tensorboard package; install it with "
                              "pip install 'weclip[tensorboard]' (or pip install tensorboard), or set "
                              "train.tensorboard=false") from exc
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=start or None)

    def log(self, metrics: dict[str, Any]) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, global_step=int(metrics["step"]))

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.writer.close()
