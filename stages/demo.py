"""Stage `demo`: the whole product on the embedded shapes world, on a laptop CPU (docs/design.md §5).

generate train + val sets → manifests → extract the cache (Ray or inline) → train the decoder from the cache →
evaluate on val (msc + flip, with and without DenseCRF) and CLIP-ES pseudo masks on val → one mIoU table.
Every step reuses what a previous run left in the work folder (extract resumes committed shards, train resumes
its checkpoint), so an interrupted demo continues where it stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weclip.pipeline.config import Config, DemoConfig, preset
from weclip.pipeline.data import shapes
from weclip.stages import evaluate, extract, manifest, pseudo, train


@dataclass(frozen=True)
class DemoSummary:
    workdir: str
    rows: list[tuple[str, float | None]]  # (what was scored, mIoU in percent on val)
    train_images: int
    val_images: int
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return {"workdir": self.workdir, "miou": dict(self.rows), "train_images": self.train_images,
                "val_images": self.val_images, "iterations": self.iterations}

    def format(self) -> str:
        width = max(len(name) for name, _ in self.rows)
        lines = [f"weclip demo — shapes world, {self.train_images} train / {self.val_images} val images, "
                 f"{self.iterations} training steps (work folder {self.workdir})", "",
                 f"| {'output (val set)'.ljust(width)} | mIoU % |", f"|{'-' * (width + 2)}|-------:|"]
        lines += [f"| {name.ljust(width)} | {'n/a' if v is None else f'{v:6.2f}'} |" for name, v in self.rows]
        return "\n".join(lines)


def shapes_dataset(root: Path, split: str, count: int, seed: int, size: int) -> Path:
    """Generate one split (skipped when its list file already names `count` images) and build its manifest."""
    listing = root / "ImageSets/Segmentation" / f"{split}.txt"
    if not listing.exists() or len(listing.read_text().split()) != count:
        shapes.generate(root, split, count, seed, size)
    return manifest.run("shapes", root, root.parent / f"shapes_{split}.parquet", split=split,
                        progress=False).manifest_path


def _percent(miou: float | None) -> float | None:
    return None if miou is None else 100.0 * miou


def run(out: str | Path = "runs/demo", quick: bool = False, executor: str = "ray",
        cfg: Config | None = None, demo: DemoConfig = DemoConfig(), progress: bool = True) -> DemoSummary:
    """Run the demo in the work folder `out`. quick: a CI-sized run (a few images, a few steps) that exercises every
    stage."""
    cfg = cfg or preset("shapes")
    workdir = Path(out).resolve()
    n_train, n_val = ((demo.quick_train_images, demo.quick_val_images) if quick
                      else (demo.train_images, demo.val_images))
    if quick:
        cfg = cfg.replace(train={"iterations": demo.quick_iterations, "checkpoint_every": demo.quick_iterations})
    image_size = cfg.aug.crop
    data = workdir / "data"
    train_manifest = shapes_dataset(data, "train", n_train, demo.seed, image_size)
    val_manifest = shapes_dataset(data, "val", n_val, demo.seed + 1, image_size)

    extract.run(cfg, train_manifest, workdir / "cache", executor=executor, progress=progress)
    run_dir = workdir / "train"
    resume = (run_dir / train.CHECKPOINT_NAME).exists()
    trained = train.run(cfg, workdir / "cache", run_dir, resume=resume, progress=progress)
    checkpoint = trained.checkpoint

    plain = evaluate.run(checkpoint, val_manifest, workdir / "eval", crf=False, visualize=4, progress=progress)
    with_crf = evaluate.run(checkpoint, val_manifest, workdir / "eval_crf", crf=True, progress=progress)
    clipes = pseudo.run(val_manifest, workdir / "pseudo_clipes", cfg, source="clip-es", progress=progress)
    rows = [
        ("CLIP-ES pseudo masks (Softmax-Grad-CAM + CAA + CRF)", _percent(clipes.miou)),  # confident pixels only
        ("WeCLIP decoder (msc + flip)", _percent(plain.miou)),
        ("WeCLIP decoder (msc + flip) + DenseCRF", _percent(with_crf.miou)),
    ]
    return DemoSummary(str(workdir), rows, n_train, n_val, cfg.train.iterations)
