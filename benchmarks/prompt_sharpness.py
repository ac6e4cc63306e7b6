"""Does CLIP-ES's sharpness pick the template with the best CAMs? The shapes world with the shipped tiny CLIP.

    .venv/bin/python benchmarks/prompt_sharpness.py [--count 100 --seed 2024] > benchmarks/results/prompt_sharpness.json

A held-out shapes val set (`count` images, seed 2024 as `shapes_quality.py`, not the tiny CLIP's training seed) is
generated into `--workdir` and read back from its files. Candidates: the built-in templates (20 of CLIP's ImageNet
templates + "a clean origami {}.") and the tiny CLIP's own "a photo of {}.", the only one its captions used. Each is
scored by `stages.prompts.run` with `--cam-miou`: sharpness with the softmax over the image's classes + background
prompts (`text.sharpness_softmax=cam`, the default) and the raw Softmax-Grad-CAM mIoU (no CAA, no CRF) on the
masks. The sharpness with the two other softmax sets (`all`, `labels`) is reported beside it, each with its
Spearman correlation to the mIoU (negative = lower sharpness, better CAMs, as [PC] Fig. 3). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from weclip.pipeline.config import preset  # noqa: E402
from weclip.pipeline.files import repo_relative, sha256_file  # noqa: E402
from weclip.pipeline.inference.prompt_search import spearman  # noqa: E402
from weclip.pipeline.model.prompts import BUILTIN_TEMPLATES  # noqa: E402
from weclip.stages import prompts  # noqa: E402
from weclip.stages.demo import shapes_dataset  # noqa: E402


def main() -> None:
    cfg = preset("shapes")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2024, help="val world seed (the tiny CLIP trains on seed 0)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/prompt_sharpness"))
    args = parser.parse_args()
    tic = time.time()
    manifest = shapes_dataset(args.workdir / f"val-s{args.seed}-n{args.count}" / "data", "val", args.count,
                              args.seed, cfg.aug.crop)
    templates = args.workdir / "templates.txt"
    templates.write_text("\n".join((cfg.text.template, *BUILTIN_TEMPLATES)) + "\n")
    report = prompts.run(cfg, manifest, templates, cam_miou=True, progress=sys.stderr.isatty())
    miou = {s.template: s.cam_miou for s in report.scores}
    rows = {s.template: {"sharpness_cam": s.sharpness, "cam_miou": round(100 * s.cam_miou, 2)} for s in report.scores}
    correlation = {"cam": report.spearman}
    for over in ("all", "labels"):
        other = prompts.run(cfg.replace(text={"sharpness_softmax": over}), manifest, templates, progress=False)
        for s in other.scores:
            rows[s.template][f"sharpness_{over}"] = s.sharpness
        correlation[over] = spearman([s.sharpness for s in other.scores], [miou[s.template] for s in other.scores])
    best = max(miou, key=miou.get)
    print(json.dumps({
        "images": report.images, "seed": args.seed, "model": cfg.model.name,
        "checkpoint": repo_relative(cfg.model.pretrained), "sha256": sha256_file(Path(cfg.model.pretrained)),
        "preset_template": cfg.text.template,
        "spearman_sharpness_vs_cam_miou": correlation,
        "lowest_sharpness": report.scores[0].template, "best_cam_miou": best,
        "table": [{"template": t, **values} for t, values in rows.items()],  # ranked by sharpness_cam
        "seconds": round(time.time() - tic, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
