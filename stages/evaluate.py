"""Stage `evaluate`: a trained decoder with the frozen backbone online, multi-scale + flip, optional DenseCRF, mIoU.

For every manifest image (ALGORITHM.md §8.1): ImageNet-normalised original image (the checkpoint's normalisation)
→ `msc_flip_logits` (long side 512, scales 1.0 / 0.75, h-flip) → argmax, or with `crf` softmax → DenseCRF with
WeCLIP's parameters on the RGB uint8 image (§8.1 step 6) → confusion matrix against the GT mask (255 ignored, mean
over classes with GT pixels, §5.3) → `report.json` + `report.md`; optional VOC-palette prediction PNGs and a
visualisation grid.

The DenseCRF runs in a process pool (`CrfPool`) whose results are counted against its inputs: an image whose CRF
raises or whose worker process dies is re-run (`eval.crf_retries` times, a crash alone in a fresh pool so that the
crash is attributed to the right image) and otherwise fails the run with an error naming it. A report therefore
always counts every image of the manifest. The pool, the checkpoint loading and the report writer are shared with
`stages/infer.py` and `stages/pseudo.py`.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from pipeline.data.augment import normalise
from pipeline.model.backbone import FrozenCLIP
from pipeline.cache import fingerprint as fp
from pipeline.training.checkpoint import Checkpoint, build_decoder_from_checkpoint, load_checkpoint
from pipeline.config import CrfParams, EvalConfig
from pipeline.refinement.crf import crf_labels, dense_crf
from pipeline.data.images import ImageDecodeError, load_manifest_rgb, load_mask
from pipeline.data.manifest import Manifest, ManifestRow, read_manifest
from pipeline.model.decoder import WeCLIPDecoder
from pipeline.extract.worker import load_backbone
from pipeline.inference.segment import SegFn, floor_to_patches, msc_flip_logits, resize_long_side, segment_fn, weclip_cam_maps
from pipeline.metrics import ConfusionMatrix
from pipeline.palette import colorize, save_label_png
from pipeline.model.text import class_set, text_embeddings
from pipeline.visualize import GRID_COLUMNS, cam_panels, save_sample_grid

T = TypeVar("T")
BACKGROUND = "background"
CRF_FAULT_ENV = "WECLIP_CRF_FAULT"
REPORT_JSON, REPORT_MD = "report.json", "report.md"
PREDICTIONS_DIR, GRID_NAME = "predictions", "visualize.png"


class EvalError(ValueError):
    """The evaluation inputs (checkpoint, manifest, images) cannot be used as asked."""


class CrfError(RuntimeError):
    """The DenseCRF of an image failed on every attempt; the message names the image."""


# ---------------------------------------------------------------------------------------------------------------
# DenseCRF jobs and the process pool that runs them.

@dataclass(frozen=True)
class CrfJob:
    """One image's DenseCRF: `image` H×W×3 uint8 (what the bilateral term compares), `probs` K×H×W scores, `keys` the
    label of each channel; `confidence` (CLIP-ES CGL) turns pixels whose posterior max is below it into 255."""
    key: str
    image: np.ndarray
    probs: np.ndarray
    keys: np.ndarray
    params: CrfParams
    confidence: float | None = None


def _inject_fault(key: str, attempt: int) -> None:
    """Test hook: WECLIP_CRF_FAULT="<raise|exit>:<n>:<image key>" makes the CRF of that image raise, or kill its
    worker process (`exit`, only inside a pool worker; in the main process it raises), on its first n attempts
    (n = 0: on every attempt). Unset in normal use."""
    spec = os.environ.get(CRF_FAULT_ENV)
    if not spec:
        return
    mode, times, target = spec.split(":", 2)
    if target != key or (int(times) and attempt >= int(times)):
        return
    if mode == "exit" and multiprocessing.parent_process() is not None:
        os._exit(70)
    raise RuntimeError(f"injected CRF fault ({CRF_FAULT_ENV}={spec})")


def crf_job(job: CrfJob, attempt: int = 0) -> np.ndarray:
    """Run one job: H×W uint8 labels = keys[argmax Q] (255 where below `confidence`)."""
    _inject_fault(job.key, attempt)
    posterior = dense_crf(job.image, job.probs, job.params)
    return crf_labels(posterior, job.keys, job.confidence).astype(np.uint8)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where the OS has it: a worker only runs numpy + pydensecrf (no torch, no OpenMP), and a spawned worker
    would re-import torch and open_clip first (~10 s each on the 2-core dev machine)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


class CrfPool:
    """Runs `CrfJob`s in `workers` processes (0 = in this process) and yields exactly one result per job.

    `imap` pulls jobs lazily (at most 2 × workers in flight, so the producer — the backbone — runs while the CRF
    works). A job that raises is re-run up to `retries` times. A dead worker breaks the whole pool: the images it
    took down are re-run one at a time in a fresh pool, so that a crash is charged to the image that caused it
    (innocent images are not charged), and an image that still fails after `retries` re-runs raises CrfError
    naming it. Results are counted against the jobs taken; any difference raises.
    """

    def __init__(self, workers: int, retries: int) -> None:
        if workers < 0 or retries < 0:
            raise ValueError(f"CRF workers and retries must be >= 0, got {workers} and {retries}")
        self.workers, self.retries = workers, retries

    def _charge(self, job: CrfJob, attempt: int, reason: str) -> int:
        if attempt >= self.retries:
            raise CrfError(f"DenseCRF failed for image {job.key} on all {attempt + 1} attempt(s): {reason}. "
                           "The run is stopped rather than reporting fewer images; fix the cause (memory, image) or "
                           "raise eval.crf_retries")
        return attempt + 1

    def imap(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        if self.workers == 0:
            yield from self._inline(jobs)
        else:
            yield from self._pooled(jobs)

    def _inline(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        for job in jobs:
            attempt = 0
            while True:
                try:
                    labels = crf_job(job, attempt)
                    break
                except Exception as exc:  # any failure of one image's CRF is charged to that image
                    attempt = self._charge(job, attempt, f"{type(exc).__name__}: {exc}")
            yield job.key, labels

    def _pooled(self, jobs: Iterable[CrfJob]) -> Iterator[tuple[str, np.ndarray]]:
        source = iter(jobs)
        limit = 2 * self.workers
        executor: ProcessPoolExecutor | None = None
        in_flight: dict[Future, tuple[CrfJob, int, bool]] = {}  # future -> (job, attempt, alone in the pool)
        retry: deque[tuple[CrfJob, int]] = deque()  # raised: re-run normally
        isolate: deque[tuple[CrfJob, int]] = deque()  # in flight when a worker died: re-run one at a time
        taken = returned = 0
        exhausted = False

        def next_job() -> tuple[CrfJob, int, bool] | None:
            nonlocal taken, exhausted
            if isolate:
                return None if in_flight else (*isolate.popleft(), True)
            if len(in_flight) >= limit:
                return None
            if retry:
                return (*retry.popleft(), False)
            job = None if exhausted else next(source, None)
            exhausted = job is None
            taken += not exhausted
            return None if job is None else (job, 0, False)

        try:
            while True:
                while (entry := next_job()) is not None:
                    job, attempt, alone = entry
                    executor = executor or ProcessPoolExecutor(self.workers, mp_context=_pool_context())
                    try:
                        in_flight[executor.submit(crf_job, job, attempt)] = entry
                    except BrokenProcessPool:  # a worker died since the last wait; its own future reports it
                        (isolate if alone else retry).appendleft((job, attempt))
                        if in_flight:
                            break
                        executor.shutdown(wait=True, cancel_futures=True)
                        executor = None
                if not in_flight:
                    break
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                    done, _ = wait(in_flight)  # the pool is dead: every other future is finished or lost too
                    executor.shutdown(wait=True, cancel_futures=True)
                    executor = None
                for future in done:
                    job, attempt, alone = in_flight.pop(future)
                    error = future.exception()
                    if error is None:
                        returned += 1
                        yield job.key, future.result()
                    elif isinstance(error, BrokenProcessPool):
                        if alone:
                            attempt = self._charge(job, attempt, "its worker process died (killed, out of memory "
                                                                 "or crashed)")
                        isolate.append((job, attempt))
                    else:
                        retry.append((job, self._charge(job, attempt, f"{type(error).__name__}: {error}")))
        finally:
            if executor is not None:
                executor.shutdown(wait=True, cancel_futures=True)
        if returned != taken:
            raise CrfError(f"the CRF pool returned {returned} results for {taken} images")


def labelled(items: Iterable[T], predict: Callable[[T], np.ndarray | CrfJob], pool: CrfPool | None
             ) -> Iterator[tuple[T, np.ndarray]]:
    """(item, H×W uint8 labels) for every item: `predict` gives the labels, or with a pool a CrfJob (keys unique
    among the items) that runs there; results may then come back out of order."""
    if pool is None:
        for item in items:
            yield item, predict(item)
        return
    pending: dict[str, T] = {}

    def jobs() -> Iterator[CrfJob]:
        for item in items:
            job = predict(item)
            if job.key in pending:
                raise ValueError(f"two images share the CRF job key {job.key!r}")
            pending[job.key] = item
            yield job

    for key, labels in pool.imap(jobs()):
        yield pending.pop(key), labels


# ---------------------------------------------------------------------------------------------------------------
# A trained checkpoint with its backbone, ready to predict.

@dataclass
class Predictor:
    checkpoint: Checkpoint
    backbone: FrozenCLIP
    decoder: WeCLIPDecoder
    seg: SegFn

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the decoder's outputs: background, then the checkpoint's classes."""
        return (BACKGROUND, *self.checkpoint.class_names)

    def normalised(self, rgb: np.ndarray) -> torch.Tensor:
        """H×W×3 uint8 → 1×3×H×W with the statistics the backbone saw in training."""
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].to(self.backbone.device)
        return normalise(image, self.checkpoint.config.model.normalisation)

    def logits(self, rgb: np.ndarray, cfg: EvalConfig) -> torch.Tensor:
        """C×H×W multi-scale + flip logits (§8.1)."""
        return msc_flip_logits(self.seg, self.normalised(rgb), cfg)

    def predict(self, key: str, rgb: np.ndarray, cfg: EvalConfig, crf: bool) -> np.ndarray | CrfJob:
        """argmax labels H×W uint8, or the WeCLIP DenseCRF job: softmax of the logits on the RGB image (§8.1 step 6)."""
        logits = self.logits(rgb, cfg)
        if not crf:
            return logits.argmax(dim=0).to(torch.uint8).cpu().numpy()
        probs = torch.softmax(logits.float(), dim=0).cpu().numpy()
        return CrfJob(key, rgb, probs, np.arange(probs.shape[0]), cfg.crf_params)


def load_predictor(checkpoint: str | Path, device: str | torch.device,
                   model_configs: Sequence[str | Path] = ()) -> Predictor:
    """Checkpoint → its backbone (from the checkpoint's model config) and decoder, checked to belong together."""
    ckpt = load_checkpoint(checkpoint)
    cfg = ckpt.config
    backbone = load_backbone(cfg.model, str(device), tuple(str(Path(p).resolve()) for p in model_configs))
    trained_on = ckpt.fingerprint.get("checkpoint")
    if trained_on != backbone.identity:
        raise EvalError(f"checkpoint {ckpt.path} was trained on features of backbone {trained_on!r}, but its model "
                        f"config ({cfg.model.name}, pretrained={cfg.model.pretrained!r}) loads {backbone.identity!r}; "
                        "put the backbone weights it was trained with back at that path")
    decoder = build_decoder_from_checkpoint(ckpt).to(backbone.device)
    return Predictor(ckpt, backbone, decoder, segment_fn(backbone, decoder, cfg.extract.feature_layers))


def check_classes(ckpt: Checkpoint, manifest: Manifest) -> None:
    """The manifest's classes must be the checkpoint's (names and the fingerprint's class hash)."""
    if tuple(manifest.class_names) != tuple(ckpt.class_names):
        raise EvalError(f"manifest {manifest.path} (dataset {manifest.dataset!r}, {manifest.num_classes} classes "
                        f"{list(manifest.class_names[:4])}...) does not have the classes of checkpoint {ckpt.path} "
                        f"({len(ckpt.class_names)} classes {list(ckpt.class_names[:4])}...); evaluate a checkpoint "
                        "trained on this dataset's class set")
    if fp.sha256_json(list(manifest.class_names)) != ckpt.fingerprint.get("classes_sha256"):
        raise EvalError(f"checkpoint {ckpt.path} records class names whose hash differs from its fingerprint's "
                        f"classes_sha256; the file is inconsistent, use another checkpoint of the run")


def read_rgb(manifest: Manifest, row: ManifestRow) -> np.ndarray:
    """A manifest image, which must still decode at the manifest's size (errors name the image)."""
    path = manifest.image_abspath(row)
    try:
        return load_manifest_rgb(path, row.height, row.width)
    except ImageDecodeError as err:
        raise EvalError(f"image {row.image_id} ({path}) cannot be used: {err}. Every manifest image is "
                        "counted; fix the file or rebuild the manifest") from err


def read_gt(manifest: Manifest, row: ManifestRow) -> np.ndarray:
    path = manifest.mask_abspath(row)
    try:
        mask = load_mask(path)
    except ImageDecodeError as err:
        raise EvalError(f"mask of image {row.image_id} ({path}) cannot be decoded: {err}") from err
    if mask.shape != (row.height, row.width):
        raise EvalError(f"mask of image {row.image_id} ({path}) is {mask.shape[0]}x{mask.shape[1]}, the image "
                        f"{row.height}x{row.width}; rebuild the manifest")
    return mask


# ---------------------------------------------------------------------------------------------------------------
# Reports.

def score_dict(cm: ConfusionMatrix, names: Sequence[str]) -> dict[str, Any]:
    """mIoU, pixel accuracy, per-class IoU and GT pixel counts, and the confusion matrix (rows = GT)."""
    return {**cm.to_dict(list(names)), "gt_pixels": dict(zip(names, cm.matrix.sum(axis=1).tolist())),
            "confusion": cm.matrix.tolist()}


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def markdown_report(title: str, lines: Sequence[str], scores: dict[str, Any] | None) -> str:
    """A Markdown page: title, summary lines, and the per-class IoU table (classes without GT pixels are listed
    but not in the mean, §5.3)."""
    out = [f"# {title}", "", *(f"- {line}" for line in lines), ""]
    if scores is not None:
        out += [f"**mIoU {percent(scores['miou'])}** (pixel accuracy {percent(scores['pixel_accuracy'])}, "
                f"{scores['pixels']} pixels scored)", "", "| class | IoU (%) | GT pixels |", "|---|---:|---:|"]
        out += [f"| {name} | {percent(iou)}{'' if scores['gt_pixels'][name] else ' (not in mean)'} | "
                f"{scores['gt_pixels'][name]} |" for name, iou in scores["iou"].items()]
    return "\n".join(out) + "\n"


def write_reports(out_dir: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """`report.json` and `report.md` in out_dir, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / REPORT_JSON, out_dir / REPORT_MD
    for path, text in zip(paths, (json.dumps(payload, indent=2) + "\n", markdown)):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def crf_pool(crf: bool, cfg: EvalConfig, workers: int | None) -> CrfPool | None:
    return CrfPool(cfg.crf_workers if workers is None else workers, cfg.crf_retries) if crf else None


# ---------------------------------------------------------------------------------------------------------------
# The stage.

@dataclass(frozen=True)
class EvalReport:
    checkpoint: str
    step: int
    manifest: str
    dataset: str
    images: int  # always the manifest's row count
    crf: bool
    eval: dict[str, Any]  # the EvalConfig used
    miou: float | None
    pixel_accuracy: float | None
    pixels: int
    iou: dict[str, float | None]
    gt_pixels: dict[str, int]
    confusion: list[list[int]]
    device: str
    seconds: float
    images_per_s: float
    report_json: str
    report_md: str
    predictions: str | None
    visualization: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        return "\n".join([
            f"evaluated {self.images} images of {self.manifest} with {self.checkpoint} (step {self.step}), "
            f"CRF {'on' if self.crf else 'off'}, on {self.device}",
            f"  mIoU {percent(self.miou)}  pixel accuracy {percent(self.pixel_accuracy)}  "
            f"({self.seconds:.1f} s, {self.images_per_s:.2f} images/s)",
            f"  report {self.report_md}"
            + (f", predictions {self.predictions}" if self.predictions else "")
            + (f", grid {self.visualization}" if self.visualization else "")])


def _cam_panels(predictor: Predictor, rgb: np.ndarray, labels: Sequence[int], cfg: EvalConfig) -> dict[str, np.ndarray]:
    """Image, CAM, refined CAM and online pseudo label of one image (WeCLIP 'val' mode, RFM on), at the image size."""
    ckpt_cfg = predictor.checkpoint.config
    text = text_embeddings(predictor.backbone, class_set(ckpt_cfg.text.classes), ckpt_cfg.text.template)
    x = floor_to_patches(resize_long_side(predictor.normalised(rgb), cfg.long_side), predictor.backbone.patch_size)
    maps = weclip_cam_maps(predictor.backbone, predictor.decoder, text, x, labels, ckpt_cfg.extract.feature_layers,
                           ckpt_cfg)
    return cam_panels(rgb, maps.cams.cpu().numpy(), maps.refined.cpu().numpy(), maps.pseudo.cpu().numpy())


def run(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path, cfg: EvalConfig | None = None,
        crf: bool | None = None, save_predictions: bool = False, visualize: int = 0, workers: int | None = None,
        device: str | None = None, model_configs: Sequence[str | Path] = (), progress: bool = True) -> EvalReport:
    """Evaluate a checkpoint on every image of a manifest with masks.

    cfg: inference settings (default: the checkpoint's `eval` section); crf: DenseCRF on/off (default cfg.crf);
    save_predictions: VOC-palette PNGs in out_dir/predictions; visualize: a grid of the first N images (image,
    CAM, refined CAM, pseudo label, prediction, GT) in out_dir/visualize.png; workers: CRF processes (default
    cfg.crf_workers); model_configs: extra open_clip configs to register (e.g. a test's tiny ViT).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    predictor = load_predictor(checkpoint, dev, model_configs)
    ckpt = predictor.checkpoint
    cfg = ckpt.config.eval if cfg is None else cfg
    crf = cfg.crf if crf is None else crf
    data = read_manifest(manifest)
    check_classes(ckpt, data)
    unlabelled = [r.image_id for r in data.rows if r.mask_path is None]
    if unlabelled:
        raise EvalError(f"manifest {data.path} has {len(unlabelled)} images without a mask (e.g. {unlabelled[:3]}); "
                        "evaluation needs ground truth — use `weclip infer` for unlabelled images")
    names = predictor.class_names
    cm = ConfusionMatrix(len(names))
    pred_dir = out_dir / PREDICTIONS_DIR if save_predictions else None
    grid_rows: dict[int, tuple[str, dict[str, np.ndarray]]] = {}
    rows = list(enumerate(data.rows))

    def predict(item: tuple[int, ManifestRow]) -> np.ndarray | CrfJob:
        index, row = item
        rgb = read_rgb(data, row)
        if index < visualize:
            grid_rows[index] = (row.image_id, _cam_panels(predictor, rgb, row.labels, cfg))
        return predictor.predict(row.image_id, rgb, cfg, crf)

    counted = 0
    bar = tqdm(total=len(rows), desc="evaluate", unit="img", disable=not progress)
    with bar:
        for (index, row), labels in labelled(rows, predict, crf_pool(crf, cfg, workers)):
            gt = read_gt(data, row)
            cm.update(labels, gt)
            if pred_dir is not None:
                save_label_png(pred_dir / f"{row.image_id}.png", labels)
            if index in grid_rows:
                grid_rows[index][1].update({"prediction": colorize(labels), "ground truth": colorize(gt)})
            counted += 1
            bar.update(1)
    if counted != len(data):
        raise EvalError(f"scored {counted} images but the manifest has {len(data)}; the report would be incomplete")
    grid_path = None
    if grid_rows:
        grid_path = save_sample_grid(out_dir / GRID_NAME, [grid_rows[i] for i in sorted(grid_rows)], GRID_COLUMNS)
    seconds = time.perf_counter() - started
    scores = score_dict(cm, names)
    report = EvalReport(
        checkpoint=str(ckpt.path), step=ckpt.step, manifest=str(data.path), dataset=data.dataset, images=counted,
        crf=crf, eval=asdict(cfg), miou=scores["miou"], pixel_accuracy=scores["pixel_accuracy"],
        pixels=scores["pixels"], iou=scores["iou"], gt_pixels=scores["gt_pixels"], confusion=scores["confusion"],
        device=str(dev), seconds=seconds, images_per_s=counted / seconds if seconds > 0 else 0.0,
        report_json=str(out_dir / REPORT_JSON), report_md=str(out_dir / REPORT_MD),
        predictions=None if pred_dir is None else str(pred_dir),
        visualization=None if grid_path is None else str(grid_path))
    lines = [f"checkpoint `{ckpt.path}` (step {ckpt.step})", f"manifest `{data.path}` ({data.dataset}), "
             f"{counted} images", f"scales {list(cfg.scales)}, flip {cfg.flip}, long side {cfg.long_side}, "
             f"CRF {'on' if crf else 'off'}"]
    write_reports(out_dir, report.to_dict(), markdown_report("weclip evaluate", lines, scores))
    return report
