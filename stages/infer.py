"""Stage `infer`: segment one image file or a folder of images (no masks) with a trained checkpoint.

The same inference as `weclip evaluate` (multi-scale + flip, optional DenseCRF in the checked process pool,
docs/algorithm.md §8.1), written as VOC-palette PNGs mirroring the folder's layout (`<out>/<relative path>.png`), with
optional overlays (`<out>/overlays/...`); a single image file is written as `<out>/<name>.png`. An image that cannot
be decoded, or that is too small for one patch at an inference scale (a 4×3000 strip), is listed in
`<out>/failures.jsonl` and in the summary, and every other image is still written.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from weclip.pipeline.config import EvalConfig
from weclip.pipeline.errors import InferError
from weclip.pipeline.files import atomic_write_text, require_local
from weclip.pipeline.inference.crf_pool import CrfJob, crf_pool, labelled
from weclip.pipeline.inference.predict import load_predictor
from weclip.pipeline.inference.segment import ImageTooSmall, check_msc_size
from weclip.pipeline.model.backbone import default_device
from weclip.pipeline.data.images import ImageDecodeError, load_rgb
from weclip.pipeline.data.manifest import strip_image_suffix
from weclip.pipeline.palette import save_label_png
from weclip.pipeline.visualize import overlay, save_rgb_png

FAILURES_NAME, OVERLAY_DIR = "failures.jsonl", "overlays"


@dataclass(frozen=True)
class InferSummary:
    images_dir: str
    out_dir: str
    checkpoint: str
    found: int  # files with an image suffix
    written: int
    failed: list[dict[str, str]]  # image (relative path), reason, detail
    failures_file: str
    crf: bool
    overlays: str | None
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": self.images_per_s}

    def format(self) -> str:
        lines = [f"segmented {self.written} of {self.found} images in {self.images_dir} with {self.checkpoint} "
                 f"(CRF {'on' if self.crf else 'off'}) → {self.out_dir} ({self.seconds:.1f} s, "
                 f"{self.images_per_s:.2f} images/s)"]
        if self.failed:
            lines.append(f"  {len(self.failed)} image(s) could not be segmented (listed in {self.failures_file}):")
            lines += [f"    {f['image']}: {f['reason']} ({f['detail']})" for f in self.failed]
        return "\n".join(lines)


def list_images(folder: Path, exclude: Path | None = None) -> list[Path]:
    """Files under `folder` (recursive, sorted, hidden ones and those under `exclude` skipped) whose suffix is an
    image format's."""
    if not folder.is_dir():
        raise InferError(f"{folder} is not a folder of images")
    skip = None if exclude is None else exclude.resolve()
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and strip_image_suffix(p.name) != p.name  # the suffix is stripped only for image suffixes
                  and (skip is None or not p.resolve().is_relative_to(skip)))


def image_inputs(images: Path, exclude: Path | None = None) -> tuple[Path, list[Path]]:
    """(the folder output names are relative to, the image files): a folder's images (`list_images`), or one image
    file on its own, so that `weclip infer CKPT photo.jpg` needs no folder made for it."""
    if images.is_dir():
        return images, list_images(images, exclude)
    if not images.exists():
        raise InferError(f"{images} does not exist; give an image file or a folder of images")
    if strip_image_suffix(images.name) == images.name:
        raise InferError(f"{images} is not an image file (by its suffix) nor a folder of images")
    return images.parent, [images]


def output_names(folder: Path, files: Sequence[Path]) -> dict[Path, str]:
    """file → output name '<relative path without suffix>'; two files that would share one output are refused."""
    names: dict[str, Path] = {}
    for path in files:
        name = path.relative_to(folder).with_suffix("").as_posix()
        if name in names:
            raise InferError(f"{names[name]} and {path} would both be written as {name}.png; rename one of them")
        names[name] = path
    return {path: name for name, path in names.items()}


def _write_failures(path: Path, failures: list[dict[str, str]]) -> Path:
    """Always written (empty when nothing failed), so a stale list never survives a rerun."""
    return atomic_write_text(path, "".join(json.dumps(f) + "\n" for f in failures))


def run(checkpoint: str | Path, images: str | Path, out_dir: str | Path, cfg: EvalConfig | None = None,
        crf: bool | None = None, overlays: bool = False, workers: int | None = None, device: str | None = None,
        model_configs: Sequence[str | Path] = (), progress: bool = True, pretrained: str | None = None
        ) -> InferSummary:
    """Segment the image file `images`, or every image under the folder `images` (recursive), into `out_dir`.

    cfg: inference settings (default: the checkpoint's `eval` section); crf: DenseCRF (default cfg.crf);
    overlays: also write the images with their labels blended on top (weight cfg.overlay_alpha); workers: CRF
    processes (default cfg.crf_workers); model_configs: extra open_clip configs to register.
    """
    started = time.perf_counter()
    out_dir = require_local(out_dir, "output folder")
    folder, files = image_inputs(Path(images), exclude=out_dir)  # outputs inside the input folder are not inputs
    names = output_names(folder, files)
    predictor = load_predictor(checkpoint, default_device(device), model_configs, pretrained)
    cfg = predictor.checkpoint.config.eval if cfg is None else cfg
    crf = cfg.crf if crf is None else crf
    failures: list[dict[str, str]] = []

    def decoded() -> Iterator[tuple[str, np.ndarray]]:
        for path in files:
            try:
                rgb = load_rgb(path)
                check_msc_size(*rgb.shape[:2], cfg, predictor.backbone.patch_size)
            except (ImageDecodeError, ImageTooSmall) as err:
                failures.append({"image": path.relative_to(folder).as_posix(), "reason": err.reason,
                                 "detail": str(err)})
                continue
            yield names[path], rgb

    def predict(item: tuple[str, np.ndarray]) -> np.ndarray | CrfJob:
        return predictor.predict(item[0], item[1], cfg, crf)

    written = 0
    with tqdm(total=len(files), desc="infer", unit="img", disable=not progress) as bar:
        for (name, rgb), labels in labelled(decoded(), predict, crf_pool(crf, cfg, workers)):
            save_label_png(out_dir / f"{name}.png", labels)
            if overlays:
                save_rgb_png(out_dir / OVERLAY_DIR / f"{name}.png", overlay(rgb, labels, cfg.overlay_alpha))
            written += 1
            bar.update(1)
        bar.update(len(failures))
    failures_file = _write_failures(out_dir / FAILURES_NAME, failures)
    if written + len(failures) != len(files):
        raise InferError(f"{written} written + {len(failures)} failed != {len(files)} images found in {folder}")
    return InferSummary(images_dir=str(images), out_dir=str(out_dir), checkpoint=str(predictor.checkpoint.path),
                        found=len(files), written=written, failed=failures, failures_file=str(failures_file),
                        crf=crf, overlays=str(out_dir / OVERLAY_DIR) if overlays else None,
                        seconds=time.perf_counter() - started)
