"""`weclip` command line: thin. Parses options, builds the config, calls one stage, prints its summary.

Stage modules are imported inside each command so that `weclip --help` does not pay for torch and Ray. Errors raised
on purpose (`pipeline.errors.WeclipError`) print as one `error: …` line with exit code 2; `--debug` (or
WECLIP_DEBUG=1) shows their traceback. Any other exception is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="weclip: weakly supervised segmentation with a frozen CLIP backbone (WeCLIP / CLIP-ES), cache once, train many.",
)

DEBUG_ENV = "WECLIP_DEBUG"
_debug = False  # set per invocation by `main` and the --debug option


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (or WECLIP_DEBUG=1).")
             ) -> None:
    global _debug
    _debug = _debug or debug


def main(argv: Optional[list[str]] = None) -> None:
    """The `weclip` console script: the typer app, with user errors as one line on stderr and exit code 2."""
    from pipeline.errors import WeclipError

    global _debug
    _debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        app(args=argv, prog_name="weclip")
    except WeclipError as err:
        if _debug:
            raise
        typer.echo("error: " + " ".join(str(err).split()), err=True)
        raise SystemExit(2) from None


PresetOpt = typer.Option("voc", "--preset", help="Config preset: voc, coco or shapes (the embedded demo world).")


def _command_line() -> str:
    return "weclip " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _config(preset: str, overrides: Optional[list[str]] = None):
    """Preset + `--set section.field=value` overrides, applied in order; a value is parsed as JSON when it parses
    (`null`, `true`, `[1, 2]`), else kept as the string. A bad key or value raises ConfigError naming it, which the
    CLI prints as one `error:` line."""
    from pipeline.config import preset as load_preset, set_field
    from pipeline.errors import ConfigError

    cfg = load_preset(preset)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} has no '='; write section.field=value, e.g. --set train.iterations=1000")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        cfg = set_field(cfg, key, value)
    return cfg


SetOpt = typer.Option(None, "--set", help="Override a config field, e.g. --set train.iterations=1000 or "
                      "--set eval.crf_params.iterations=5 (repeatable; values are JSON, else strings).")


def _print(summary) -> None:
    text = summary.format() if hasattr(summary, "format") else json.dumps(summary.to_dict(), indent=2, default=str)
    typer.echo(text)


@app.command()
def manifest(
    fmt: str = typer.Argument(..., help="Dataset layout: voc, coco, folder or shapes."),
    root: Path = typer.Argument(..., help="Dataset root folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest .parquet path, or a folder for <dataset>_<split>.parquet."),
    split: Optional[str] = typer.Option(None, help="Split name (VOC default train_aug, COCO train)."),
    list_file: Optional[Path] = typer.Option(None, help="An id list replacing the layout's split list."),
    labels_from: Optional[str] = typer.Option(None, help="voc/shapes: mask (WeCLIP) or xml (CLIP-ES); coco: mask or json."),
    class_set: Optional[str] = typer.Option(None, help="Class set name (voc, coco, shapes); folder format needs one."),
    class_names_file: Optional[Path] = typer.Option(None, help="A text file of class names, one per line."),
    labels_file: Optional[Path] = typer.Option(None, help="folder format: CSV (image,labels) or JSON of labels."),
    annotations: Optional[Path] = typer.Option(None, help="coco: instances_*.json when not in the usual place."),
) -> None:
    """Build a Parquet dataset manifest; bad images go to a rejects file with the reason."""
    from stages import manifest as stage

    summary = stage.run(fmt, root, out, split=split, list_file=list_file, labels_from=labels_from,
                        class_set=class_set, class_names_file=class_names_file, labels_file=labels_file,
                        annotations=annotations, command=_command_line())
    _print(summary)


@app.command()
def extract(
    manifest: Path = typer.Argument(..., help="Training manifest (.parquet) from `weclip manifest`."),
    out: str = typer.Option(..., "--out", "-o", help="Cache folder or fsspec URL; an existing cache is resumed."),
    preset: str = PresetOpt,
    executor: str = typer.Option("ray", help="ray (local Ray, or the cluster at --ray-address) or inline."),
    ray_address: Optional[str] = typer.Option(None, help="Address of an existing Ray cluster, e.g. ray://head:10001."),
    views: Optional[int] = typer.Option(None, help="Augmented views per image (default: the preset's)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (a different plan, so a different cache)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Run the frozen CLIP once per training view; write features, attention and Grad-CAMs to a Zarr cache."""
    from stages import extract as stage

    cfg = _config(preset, set_)
    if views is not None:
        cfg = cfg.replace(extract={"views": views})
    _print(stage.run(cfg, manifest, out, executor=executor, ray_address=ray_address, limit=limit))


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache path or fsspec URL.")) -> None:
    """Show a cache's fingerprint, counts, bytes per sample and skipped images."""
    from stages import inspect as stage

    _print(stage.run(cache))


@app.command()
def train(
    out: Path = typer.Option(..., "--out", "-o", help="Run folder: checkpoints and metrics.jsonl."),
    cache: Optional[str] = typer.Option(None, help="Feature cache from `weclip extract`."),
    online: Optional[Path] = typer.Option(None, help="Train online from this manifest instead (backbone in the loop)."),
    preset: str = PresetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    iterations: Optional[int] = typer.Option(None, help="Total training iterations (default: the preset's)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop at this global step (resume later with --resume)."),
    rfm_filter: Optional[str] = typer.Option(None, help="RFM layer filter: signed (released code) or abs (paper Eq. 5)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    set_: Optional[list[str]] = SetOpt,
    val: Optional[Path] = typer.Option(None, "--val", help="Val manifest (with masks), scored every train.val_every "
                                       "steps (with --val, default train.checkpoint_every); the best: best.pt."),
) -> None:
    """Train the decoder with RFM + PAR from the cache (or --online, the released code's way)."""
    from stages import train as stage

    cfg = _config(preset, set_)
    if iterations is not None:
        cfg = cfg.replace(train={"iterations": iterations})
    if rfm_filter is not None:
        cfg = cfg.replace(refine={"rfm_filter": rfm_filter})
    if (cache is None) == (online is None):
        raise typer.BadParameter("give exactly one of --cache and --online")
    if val is not None and not cfg.train.val_every:
        cfg = cfg.replace(train={"val_every": cfg.train.checkpoint_every})
    explicit = [item.partition("=")[0].strip() for item in set_ or []]  # the rest of a cache's settings is its own
    _print(stage.run(cfg, cache, out, resume=resume, online_manifest=online, max_steps=max_steps, device=device,
                     explicit=explicit, val_manifest=val))


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint from `weclip train`."),
    manifest: Path = typer.Argument(..., help="Manifest with ground-truth masks (e.g. VOC val)."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder (report.json, report.md, predictions)."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="DenseCRF on the msc+flip logits."),
    save_predictions: bool = typer.Option(False, help="Write VOC-palette PNGs of the predictions."),
    visualize: int = typer.Option(0, help="Write a picture grid of the first N images."),
    workers: Optional[int] = typer.Option(None, help="CRF worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Multi-scale + flip inference with the backbone online, optional DenseCRF, mIoU report."""
    from stages import evaluate as stage

    _print(stage.run(checkpoint, manifest, out, crf=crf, save_predictions=save_predictions, visualize=visualize,
                     workers=workers, device=device))


@app.command()
def infer(
    checkpoint: Path = typer.Argument(..., help="A checkpoint from `weclip train`."),
    images: Path = typer.Argument(..., help="A folder of images (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for palette PNGs."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="DenseCRF on the logits."),
    overlays: bool = typer.Option(False, help="Also write the images with their labels blended on top."),
    workers: Optional[int] = typer.Option(None, help="CRF worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
) -> None:
    """Segment a folder of images; unreadable images are listed, the rest are written."""
    from stages import infer as stage

    _print(stage.run(checkpoint, images, out, crf=crf, overlays=overlays, workers=workers, device=device))


@app.command()
def pseudo(
    manifest: Path = typer.Argument(..., help="Training manifest to make pseudo masks for."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (masks/ and a report)."),
    source: str = typer.Option("clip-es", help="clip-es (CAM + CAA + CRF + confidence) or weclip (a checkpoint)."),
    checkpoint: Optional[Path] = typer.Option(None, help="Trained checkpoint, for --source weclip."),
    preset: str = PresetOpt,
    visualize: int = typer.Option(0, help="Write a picture grid of the first N images."),
    workers: Optional[int] = typer.Option(None, help="CRF worker processes."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Pseudo masks for a training set: CLIP-ES's or a trained WeCLIP's; scored when masks exist."""
    from stages import pseudo as stage

    cfg = _config(preset, set_) if source == "clip-es" else None
    _print(stage.run(manifest, out, cfg, source=source, checkpoint=checkpoint, workers=workers,
                     visualize=visualize, device=device))


@app.command()
def plot(
    metrics: Path = typer.Argument(..., help="metrics.jsonl of a training run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (default: next to the metrics file)."),
    smooth: float = typer.Option(0.0, "--smooth", min=0.0, max=0.999, help="EMA weight of the drawn curves, "
                                 "0 (raw) to 0.999; the raw values stay as a faint line."),
) -> None:
    """Plot the loss terms, learning rate and validation mIoU of a training run to a PNG, the RFM switch marked."""
    from pipeline.visualize import plot_metrics

    typer.echo(str(plot_metrics(metrics, out, smooth=smooth)))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint of `weclip train` (checkpoint.pt, step_*.pt, best.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Weights file to write, e.g. model.safetensors."),
) -> None:
    """Weights-only export (decoder, config, fingerprint, class names) that evaluate / infer / pseudo accept."""
    from stages import export as stage

    _print(stage.run(checkpoint, out))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Work folder; a rerun resumes what is there."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized: a few images and steps, every stage exercised."),
    executor: str = typer.Option("ray", help="Extraction executor: ray (local) or inline."),
) -> None:
    """The whole chain on the embedded shapes world and the shipped tiny CLIP; prints an mIoU table."""
    from stages import demo as stage

    _print(stage.run(workdir, quick=quick, executor=executor))


@app.command("toy-clip")
def toy_clip(
    ctx: typer.Context,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Checkpoint to write, its record next to it as .json "
                                       "(default: the shipped pipeline/assets/weclip-tiny.pt)."),
    workdir: Path = typer.Option(Path("runs/toy_clip"), help="Training state (state.pt), for --resume."),
    resume: bool = typer.Option(False, "--resume", help="Continue from WORKDIR/state.pt."),
    stop_at: Optional[int] = typer.Option(None, min=1, help="Stop after this step (state saved); continue with --resume."),
    seed: Optional[int] = typer.Option(None, help="Seed of the training world and of torch."),
    steps: Optional[int] = typer.Option(None, min=1, help="Training steps."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Image-caption pairs per step."),
    lr: Optional[float] = typer.Option(None, min=0.0, help="Peak learning rate (after warm-up; cosine decay)."),
    warmup_steps: Optional[int] = typer.Option(None, min=0, help="Linear warm-up steps."),
    weight_decay: Optional[float] = typer.Option(None, min=0.0, help="AdamW weight decay of the matrices."),
    patch_dropout: Optional[float] = typer.Option(None, help="Fraction of patch tokens dropped, in [0, 1)."),
    unmasked_fraction: Optional[float] = typer.Option(None, min=0.0, max=1.0,
                                                      help="Last fraction of the steps run on all patch tokens."),
    val_count: Optional[int] = typer.Option(None, min=1, help="Held-out images of the logged presence mAP."),
    eval_every: Optional[int] = typer.Option(None, min=1, help="Steps between presence evaluations."),
    threads: Optional[int] = typer.Option(None, min=1, help="Torch CPU threads."),
    hard_negatives: bool = typer.Option(True, "--hard-negatives/--no-hard-negatives",
                                        help="One extra caption per image naming an absent class."),
) -> None:
    """Retrain the shipped tiny CLIP on the shapes world; recipe options left out keep the shipped recipe's value."""
    from pipeline.config import preset as load_preset
    from stages import toy_clip as stage

    recipe = stage.recipe_from(ctx.params)
    out = out or Path(load_preset("shapes").model.pretrained)
    _print(stage.run(recipe, out, workdir, resume=resume, stop_at=stop_at, log=typer.echo))


if __name__ == "__main__":
    main()
