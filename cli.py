"""`weclip` command line: thin. Parses options, builds the config, calls one stage, prints its summary.

Stage modules are imported inside each command so that `weclip --help` does not pay for torch and Ray: at import
this module reads only `pipeline.config` and `pipeline.files`, which import neither (tests/test_cli.py checks it).
Errors raised on purpose (`pipeline.errors.WeclipError`) print as one `error: …` line with exit code 2; `--debug` (or
WECLIP_DEBUG=1) shows their traceback. Any other exception is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations

import dataclasses
import enum
import json
import os
import shlex
import sys
import typing
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import typer

from weclip.pipeline.config import PRESETS, Config, ManifestSettings, Settings, SharpnessSoftmax, apply_config_file, \
    dump_config, leaves, load_config_file, preset as load_preset, set_field
from weclip.pipeline.errors import ConfigError, WeclipError
from weclip.pipeline.files import json_object_option, require_local

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="weclip: weakly supervised segmentation with a frozen CLIP backbone (WeCLIP / CLIP-ES), cache once, train many.",
)

DEBUG_ENV = "WECLIP_DEBUG"
_debug = False  # set per invocation by `main` and the --debug option
_quiet = False  # set per invocation by the --quiet option


def _version() -> str:
    """The installed distribution's version, else (a source checkout run without installing it) pyproject.toml's."""
    try:
        return metadata.version("weclip")
    except metadata.PackageNotFoundError:
        import tomllib

        return tomllib.loads(Path(__file__).with_name("pyproject.toml").read_text())["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"weclip {_version()}")
        raise typer.Exit()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (or WECLIP_DEBUG=1)."),
             quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars; the summary is still printed."),
             version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                          help="Print the version and exit."),
             ) -> None:
    global _debug, _quiet
    _debug = _debug or debug
    _quiet = quiet


def _progress() -> bool:
    return not _quiet


def main(argv: Optional[list[str]] = None) -> None:
    """The `weclip` console script: the typer app, with user errors as one line on stderr and exit code 2."""
    global _debug
    _debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        app(args=argv, prog_name="weclip")
    except WeclipError as err:
        if _debug:
            raise
        typer.echo("error: " + " ".join(str(err).split()), err=True)
        raise SystemExit(2) from None


def _choice(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A str Enum of `values`: typer checks the option against it and `--help` lists the choices."""
    return enum.Enum(name, {v: v for v in values}, type=str)


Preset = _choice("Preset", PRESETS)
# The stages' own names, written here because their modules import torch (this module must not, for a fast --help);
# tests/test_cli.py checks that each equals its source.
Format = _choice("Format", ("voc", "coco", "folder", "shapes"))  # pipeline.data.registry.names()
LabelSource = _choice("LabelSource", ("mask", "xml", "json"))  # the layouts' labels_from, all formats together
Executor = _choice("Executor", ("ray", "inline"))  # stages.extract.Executor
Source = _choice("Source", ("clip-es", "weclip"))  # stages.pseudo.SOURCES
SoftmaxOver = _choice("SoftmaxOver", typing.get_args(SharpnessSoftmax))  # text.sharpness_softmax
TextFormat = _choice("TextFormat", ("yaml", "json"))

PresetOpt = typer.Option(Preset("voc"), "--preset", help="Config preset (shapes: the embedded demo world).")
ConfigOpt = typer.Option(None, "--config", help="YAML or JSON file of config sections (e.g. `train: {iterations: "
                         "1000}`), laid over the preset; --set goes on top. `weclip config show` prints one.")
SetOpt = typer.Option(None, "--set", help="Override a config field, e.g. --set train.iterations=1000 or "
                      "--set eval.crf_params.iterations=5 (repeatable; values are JSON, else strings).")
EvalSetOpt = typer.Option(None, "--set", help="Override a field of the checkpoint's eval section, e.g. "
                          "--set eval.long_side=448, or model.pretrained=PATH when the backbone weights moved "
                          "(repeatable; values are JSON, else strings).")
EvalConfigOpt = typer.Option(None, "--config", help="YAML or JSON config file; only its eval section is read (the "
                             "checkpoint fixes the model). --set goes on top.")
CheckpointOpt = typer.Option(..., "--checkpoint", help="A checkpoint from `weclip train` (RUN/checkpoint.pt).")
WorkersOpt = typer.Option(None, "--workers", help="DenseCRF worker processes (default: eval.crf_workers; 0 = this "
                          "process).")
DeviceOpt = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available).")
StorageOpt = typer.Option(None, "--storage-options", help="fsspec storage options for s3:// (and other) URLs, JSON "
                          'or @FILE, e.g. \'{"endpoint_url": "http://minio:9000"}\' (credentials: the AWS_* '
                          "variables, or key/secret here); never printed or stored.")
SECRET_OPTIONS = ("--storage-options", "--runtime-env")  # their values are never recorded (`_command_line`)


def _command_line() -> str:
    """The command line, as recorded in a manifest; the values of SECRET_OPTIONS are replaced by `***`."""
    args = sys.argv[1:]
    redacted = ["***" if i and args[i - 1] in SECRET_OPTIONS else
                next((f"{o}=***" for o in SECRET_OPTIONS if a.startswith(o + "=")), a) for i, a in enumerate(args)]
    return "weclip " + " ".join(shlex.quote(a) for a in redacted)


def _use_storage_options(text: Optional[str]) -> None:
    """`--storage-options`: the fsspec options every URL of this command (and its workers) is opened with."""
    if text is not None:
        from weclip.pipeline import storage

        storage.use_storage_options(json_object_option(text, "--storage-options",
                                                       '{"endpoint_url": "http://HOST:9000"}'))


def _parse_set(item: str) -> tuple[str, Any]:
    """`section.field=value` → (dotted key, value); the value is JSON when it parses (`null`, `true`, `[1, 2]`), else
    the string."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ConfigError(f"--set {item!r} has no '='; write section.field=value, e.g. --set train.iterations=1000")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def _settings(base: Settings, config_file: Optional[Path], overrides: Optional[list[str]]) -> Settings:
    """`base`, then the config file's sections, then each `--set`, in that order. A bad key or value raises
    ConfigError naming it (and the file), which the CLI prints as one `error:` line before any work starts."""
    cfg = base if config_file is None else apply_config_file(base, config_file)
    for item in overrides or []:
        cfg = set_field(cfg, *_parse_set(item))
    return cfg


def _config(preset: Preset | str, overrides: Optional[list[str]] = None, config_file: Optional[Path] = None) -> Config:
    """The preset (a `--preset` choice or its name), then the config file, then `--set`."""
    return _settings(load_preset(preset.value if isinstance(preset, Preset) else preset), config_file, overrides)


def _checkpoint_config(checkpoint: Path, config_file: Optional[Path], overrides: Optional[list[str]]
                       ) -> tuple[Optional[Config], Optional[str]]:
    """(the checkpoint's config with the file and `--set eval.*` on top, the new path of the backbone weights).

    For the commands whose model the checkpoint fixes: they read its eval section only (None when neither file nor
    `--set eval.*` is given: the stage reads the checkpoint's own), and `--set model.pretrained=PATH` points to the
    backbone weights when they moved since training (the stage checks them against the recorded sha256)."""
    pretrained, evals = None, []
    for item in overrides or []:
        key, _, value = item.partition("=")
        if key.strip() == "model.pretrained":
            pretrained = value.strip()
        elif item.startswith("eval."):
            evals.append(item)
        else:
            raise ConfigError(f"--set {item!r}: this command takes its config from the checkpoint and reads only its "
                              "eval section; override eval.* fields (e.g. --set eval.crf=true) or model.pretrained")
    if config_file is None and not evals:
        return None, pretrained
    from weclip.pipeline.training.checkpoint import load_checkpoint

    return _settings(load_checkpoint(checkpoint).config, config_file, evals), pretrained


def _explicit(config_file: Optional[Path], overrides: Optional[list[str]]) -> list[str]:
    """The dotted config fields the user set with --config and --set (a cache's other settings are its own)."""
    given = [] if config_file is None else list(leaves(load_config_file(config_file)))
    return given + [item.partition("=")[0].strip() for item in overrides or []]


def _from_cwd(path: Optional[Path]) -> Optional[Path]:
    """A path given on the command line, made absolute against the current directory (the data layer would read a
    relative one against the dataset root)."""
    return None if path is None else path.resolve()


def _print(summary) -> None:
    text = summary.format() if hasattr(summary, "format") else json.dumps(summary.to_dict(), indent=2, default=str)
    typer.echo(text)


@app.command()
def manifest(
    fmt: Format = typer.Argument(..., help="Dataset layout."),
    root: Path = typer.Argument(..., help="Dataset root folder."),
    out: str = typer.Option(..., "--out", "-o", help="Manifest .parquet path, or a folder for <dataset>_<split>.parquet."),
    split: Optional[str] = typer.Option(None, help="Split name (VOC default train_aug, COCO train)."),
    list_file: Optional[Path] = typer.Option(None, help="An id list replacing the layout's split list (a path "
                                             "relative to the current directory)."),
    labels_from: Optional[LabelSource] = typer.Option(None, help="voc/shapes: mask (WeCLIP) or xml (CLIP-ES); "
                                                      "coco: mask or json."),
    class_set: Optional[str] = typer.Option(None, help="Class set name (voc, coco, shapes); folder format needs one."),
    class_names_file: Optional[Path] = typer.Option(None, help="A text file of class names, one per line."),
    labels_file: Optional[Path] = typer.Option(None, help="folder format: CSV (image,labels) or JSON of labels (a "
                                               "path relative to the current directory)."),
    annotations: Optional[Path] = typer.Option(None, help="coco: instances_*.json when not in the usual place (a "
                                               "path relative to the current directory)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON config file; its manifest section is "
                                          "read. --set goes on top."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a manifest setting, e.g. --set "
                                             "manifest.decode=header (repeatable)."),
    record_root: Optional[str] = typer.Option(None, "--root", help="Record this dataset root instead of ROOT, an "
                                              "fsspec URL (s3://bucket/voc) the extract workers read the images "
                                              "from; ROOT is a local copy, checked to hold the same files."),
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Build a Parquet dataset manifest; bad images go to a rejects file with the reason."""
    _use_storage_options(storage_options)
    settings = _settings(ManifestSettings(), config, set_)
    target = require_local(out, "manifest path")
    from weclip.stages import manifest as stage

    summary = stage.run(fmt.value, root, target, split=split, list_file=_from_cwd(list_file),
                        labels_from=None if labels_from is None else labels_from.value, class_set=class_set,
                        class_names_file=class_names_file, labels_file=_from_cwd(labels_file),
                        annotations=_from_cwd(annotations), cfg=settings.manifest, progress=_progress(),
                        command=_command_line(), record_root=record_root)
    _print(summary)


@app.command()
def extract(
    manifest: str = typer.Argument(..., help="Training manifest (.parquet) from `weclip manifest`; a path or an "
                                   "fsspec URL (s3://bucket/train.parquet)."),
    out: str = typer.Option(..., "--out", "-o", help="Cache folder or fsspec URL; an existing cache is resumed."),
    preset: Preset = PresetOpt,
    executor: Executor = typer.Option(Executor("ray"), help="ray (local Ray, or the cluster at --ray-address) or "
                                      "inline (this process)."),
    ray_address: Optional[str] = typer.Option(None, help="Address of an existing Ray cluster, e.g. ray://head:10001."),
    views: Optional[int] = typer.Option(None, help="Augmented views per image (default: the preset's)."),
    limit: Optional[int] = typer.Option(None, help="Only the first N images (a different plan, so a different cache)."),
    device: Optional[str] = typer.Option(None, help="inline executor: cpu or cuda (default: cuda when available); Ray "
                                         "workers use cuda when the cluster has GPUs."),
    cpus_per_task: Optional[float] = typer.Option(None, help="Ray: CPUs per shard task (extract.cpus_per_task)."),
    gpus_per_task: Optional[float] = typer.Option(None, help="Ray: GPUs per shard task when the cluster has GPUs, "
                                                  "fractions allowed (extract.gpus_per_task)."),
    runtime_env: Optional[str] = typer.Option(None, help="Ray runtime_env for the shard tasks, JSON or @FILE, e.g. "
                                              '\'{"env_vars": {"AWS_ENDPOINT_URL": "..."}}\'; passed to Ray only.'),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, the cache size per array and the time, "
                                 "then stop: no weights loaded, no image read, nothing written."),
    views_per_s: Optional[float] = typer.Option(None, "--views-per-s", help="With --dry-run: the throughput to price "
                                                "the time at (a short --limit run prints this machine's)."),
    verify: bool = typer.Option(False, "--verify", help="On an existing cache, re-read every committed shard against "
                                "its checksums (not only file sizes) and rewrite the damaged ones."),
    storage_options: Optional[str] = StorageOpt,
    store_masks: bool = typer.Option(False, "--store-masks", help="Also store each view's ground-truth mask crop "
                                     "(255 = ignore and padding) for `weclip train --supervised` "
                                     "(extract.store_masks); the manifest needs a mask for every image."),
) -> None:
    """Run the frozen CLIP once per training view; write features, attention and Grad-CAMs to a Zarr cache."""
    _use_storage_options(storage_options)
    cfg = _config(preset, set_, config)
    if views is not None:
        cfg = cfg.replace(extract={"views": views})
    if store_masks:
        cfg = cfg.replace(extract={"store_masks": True})
    from weclip.pipeline.extract import ray_runner
    from weclip.stages import extract as stage

    _print(stage.run(cfg.replace(extract=ray_runner.resource_overrides(cpus_per_task, gpus_per_task)), manifest, out,
                     executor=executor.value, ray_address=ray_address, limit=limit, progress=_progress(),
                     device=device, dry_run=dry_run, views_per_s=views_per_s, verify=verify,
                     runtime_env=ray_runner.parse_runtime_env(runtime_env)))


@app.command()
def inspect(cache: str = typer.Argument(..., help="Cache path or fsspec URL."),
            verify: bool = typer.Option(False, "--verify", help="Re-read every committed shard against its checksums "
                                        "(reads all the data; without it, file sizes only)."),
            storage_options: Optional[str] = StorageOpt) -> None:
    """Show a cache's fingerprint, counts, bytes per sample, skipped images and damaged shards."""
    _use_storage_options(storage_options)
    from weclip.stages import inspect as stage

    _print(stage.run(cache, verify=verify))


@app.command()
def train(
    out: str = typer.Option(..., "--out", "-o", help="Run folder: checkpoints and metrics.jsonl."),
    cache: Optional[str] = typer.Option(None, help="Feature cache from `weclip extract`."),
    online: Optional[str] = typer.Option(None, help="Train online from this manifest instead (backbone in the loop)."),
    preset: Preset = PresetOpt,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly where it stopped."),
    iterations: Optional[int] = typer.Option(None, help="Total training iterations (default: the preset's)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop at this global step (resume later with --resume)."),
    rfm_filter: Optional[str] = typer.Option(None, help="RFM layer filter: signed (released code) or abs (paper Eq. 5)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
    val: Optional[str] = typer.Option(None, "--val", help="Val manifest (with masks), scored every train.val_every "
                                       "steps (with --val, default train.checkpoint_every); the best: best.pt."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Train on a cache whose extraction has not "
                                       "finished (its committed samples), with a warning; refused otherwise."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Training processes on this machine (DistributedDataParallel; "
                              "each reads train.batch_size / N rows of every batch; on CUDA one GPU each). Across "
                              "machines: torchrun --nnodes M --nproc-per-node N --no-python weclip train …"),
    storage_options: Optional[str] = StorageOpt,
    supervised: bool = typer.Option(False, "--supervised", help="Fully supervised: plain CE on the cache's "
                                    "ground-truth mask crops (a cache made with `extract --store-masks`), ignore "
                                    "255; no CAMs, RFM, PAR or affinity loss (train.supervised)."),
) -> None:
    """Train the decoder with RFM + PAR from the cache (or --online, the released code's way), or --supervised from
    the cache's ground-truth masks.

    Same steps, losses and checkpoints on 1 or N processes (--nproc N, or under torchrun)."""
    _use_storage_options(storage_options)
    from weclip.stages import train as stage

    cfg = _config(preset, set_, config)
    if iterations is not None:
        cfg = cfg.replace(train={"iterations": iterations})
    if supervised:
        cfg = cfg.replace(train={"supervised": True})
    if rfm_filter is not None:
        cfg = cfg.replace(refine={"rfm_filter": rfm_filter})
    if (cache is None) == (online is None):
        raise typer.BadParameter("give exactly one of --cache and --online")
    if val is not None and not cfg.train.val_every:
        cfg = cfg.replace(train={"val_every": cfg.train.checkpoint_every})
    args = (cfg, cache, require_local(out, "run folder"))
    options = dict(resume=resume, online_manifest=online, max_steps=max_steps, device=device, progress=_progress(),
                   explicit=_explicit(config, set_), val_manifest=val, allow_partial=allow_partial)
    if nproc == 1:
        _print(stage.run(*args, **options))
        return
    from weclip.pipeline.model.backbone import default_device
    from weclip.pipeline.training.distributed import spawn

    _print(spawn(nproc, stage.run, args, options, device=default_device(device)))


@app.command()
def evaluate(
    manifest: str = typer.Argument(..., help="Manifest with ground-truth masks (e.g. VOC val); a path or fsspec URL."),
    checkpoint: Path = CheckpointOpt,
    out: str = typer.Option(..., "--out", "-o", help="Report folder (report.json, report.md, predictions)."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="DenseCRF on the msc+flip logits."),
    save_predictions: bool = typer.Option(False, help="Write VOC-palette PNGs of the predictions."),
    visualize: int = typer.Option(0, help="Write a picture grid of the first N images."),
    workers: Optional[int] = WorkersOpt,
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = EvalConfigOpt,
    set_: Optional[list[str]] = EvalSetOpt,
    storage_options: Optional[str] = StorageOpt,
) -> None:
    """Multi-scale + flip inference with the backbone online, optional DenseCRF, mIoU report."""
    _use_storage_options(storage_options)
    report_dir = require_local(out, "report folder")
    cfg, pretrained = _checkpoint_config(checkpoint, config, set_)
    from weclip.stages import evaluate as stage

    _print(stage.run(checkpoint, manifest, report_dir, cfg=None if cfg is None else cfg.eval, crf=crf,
                     save_predictions=save_predictions, visualize=visualize, workers=workers, device=device,
                     progress=_progress(), pretrained=pretrained))


@app.command()
def infer(
    images: Path = typer.Argument(..., help="An image file, or a folder of images (searched recursively)."),
    checkpoint: Path = CheckpointOpt,
    out: str = typer.Option(..., "--out", "-o", help="Output folder for palette PNGs."),
    crf: Optional[bool] = typer.Option(None, "--crf/--no-crf", help="DenseCRF on the logits."),
    overlays: bool = typer.Option(False, help="Also write the images with their labels blended on top."),
    workers: Optional[int] = WorkersOpt,
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = EvalConfigOpt,
    set_: Optional[list[str]] = EvalSetOpt,
) -> None:
    """Segment an image or a folder of images; unreadable images are listed, the rest are written."""
    out_dir = require_local(out, "output folder")
    cfg, pretrained = _checkpoint_config(checkpoint, config, set_)
    from weclip.stages import infer as stage

    _print(stage.run(checkpoint, images, out_dir, cfg=None if cfg is None else cfg.eval, crf=crf, overlays=overlays,
                     workers=workers, device=device, progress=_progress(), pretrained=pretrained))


@app.command()
def pseudo(
    manifest: Path = typer.Argument(..., help="Training manifest to make pseudo masks for."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (masks/ and a report)."),
    source: Source = typer.Option(Source("clip-es"), help="clip-es (CAM + CAA + CRF + confidence) or weclip (a "
                                  "trained checkpoint's predictions)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="A checkpoint from `weclip train`, for "
                                              "--source weclip."),
    preset: Preset = PresetOpt,
    visualize: int = typer.Option(0, help="Write a picture grid of the first N images."),
    workers: Optional[int] = WorkersOpt,
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = typer.Option(None, "--config", help="YAML or JSON config file, laid over the preset "
                                          "(clip-es) or the checkpoint (weclip: its eval section); --set goes on top."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config field, e.g. --set "
                                             "eval.clipes_confidence=0.9 (weclip: eval.* only; repeatable)."),
) -> None:
    """Pseudo masks for a training set: CLIP-ES's or a trained WeCLIP's; scored when masks exist."""
    out_dir = require_local(out, "output folder")
    pretrained = None
    if source.value == "clip-es":
        cfg = _config(preset, set_, config)
    elif checkpoint is not None:
        cfg, pretrained = _checkpoint_config(checkpoint, config, set_)
    else:
        cfg = None
    from weclip.stages import pseudo as stage

    _print(stage.run(manifest, out_dir, cfg=cfg, source=source.value, checkpoint=checkpoint, workers=workers,
                     visualize=visualize, device=device, progress=_progress(), pretrained=pretrained))


@app.command()
def prompts(
    manifest: Path = typer.Argument(..., help="Manifest with image-level labels (masks too for --cam-miou)."),
    templates: str = typer.Option("builtin", "--templates", help="A text file of one template per line, each with "
                                  "one {} for the class name, or 'builtin': 20 of CLIP's ImageNet templates and "
                                  "CLIP-ES's 'a clean origami {}.'."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the ranked table: .csv (template, sharpness, "
                                      "cam_miou) or .json (the whole report)."),
    cam_miou: bool = typer.Option(False, "--cam-miou", help="Also score each template's raw Softmax-Grad-CAMs "
                                  "against the masks (one Grad-CAM per image and template) and print the Spearman "
                                  "correlation with sharpness."),
    softmax: Optional[SoftmaxOver] = typer.Option(None, "--softmax", help="What the sharpness softmax runs over: cam "
                                                  "(the image's classes + background prompts, as its Grad-CAM), "
                                                  "all (every class + background prompts), labels (the image's "
                                                  "classes only). Default: text.sharpness_softmax."),
    preset: Preset = PresetOpt,
    device: Optional[str] = DeviceOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = SetOpt,
) -> None:
    """Rank prompt templates by CLIP-ES's sharpness (lowest first) with the frozen backbone; only labels needed."""
    cfg = _config(preset, set_, config)
    if softmax is not None:
        cfg = cfg.replace(text={"sharpness_softmax": softmax.value})
    table = None if out is None else require_local(out, "table path")
    from weclip.stages import prompts as stage

    _print(stage.run(cfg, manifest, templates, table, cam_miou=cam_miou, device=device, progress=_progress()))


@app.command()
def plot(
    metrics: Path = typer.Argument(..., help="metrics.jsonl of a training run."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="PNG path (default: next to the metrics file)."),
    smooth: float = typer.Option(0.0, "--smooth", min=0.0, max=0.999, help="EMA weight of the drawn curves, "
                                 "0 (raw) to 0.999; the raw values stay as a faint line."),
) -> None:
    """Plot the loss terms, learning rate and validation mIoU of a training run to a PNG, the RFM switch marked."""
    from weclip.pipeline.visualize import plot_metrics

    typer.echo(str(plot_metrics(metrics, out, smooth=smooth)))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint of `weclip train` (checkpoint.pt, step_*.pt, best.pt)."),
    out: Path = typer.Option(..., "--out", "-o", help="Weights file to write, e.g. model.safetensors."),
) -> None:
    """Weights-only export (decoder, config, fingerprint, class names) that evaluate / infer / pseudo accept."""
    from weclip.stages import export as stage

    _print(stage.run(checkpoint, out))


@app.command()
def demo(
    out: str = typer.Option("runs/demo", "--out", "-o", help="Work folder; a rerun resumes what is there."),
    quick: bool = typer.Option(False, "--quick", help="CI-sized: a few images and steps, every stage exercised."),
    executor: Executor = typer.Option(Executor("ray"), help="Extraction executor: ray (local) or inline."),
) -> None:
    """The whole chain on the embedded shapes world and the shipped tiny CLIP; prints an mIoU table."""
    workdir = require_local(out, "demo work folder")
    from weclip.stages import demo as stage

    _print(stage.run(workdir, quick=quick, executor=executor.value, progress=_progress()))


config_app = typer.Typer(no_args_is_help=True, help="The resolved config: preset, then --config file, then --set.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(
    preset: Preset = PresetOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a config field, e.g. --set "
                                             "train.iterations=1000 or --set manifest.decode=header (repeatable)."),
    fmt: TextFormat = typer.Option(TextFormat("yaml"), "--format", help="Text format of the output."),
) -> None:
    """Print every section a command would run with (the manifest section included); the output is a --config file."""
    manifest_sets = [item for item in set_ or [] if item.startswith("manifest.")]
    cfg = _config(preset, [item for item in set_ or [] if item not in manifest_sets], config)
    settings = _settings(ManifestSettings(), config, manifest_sets)
    typer.echo(dump_config({**cfg.to_dict(), **dataclasses.asdict(settings)}, fmt.value), nl=False)


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
    from weclip.pipeline.config import preset as load_preset
    from weclip.stages import toy_clip as stage

    recipe = stage.recipe_from(ctx.params)
    out = out or Path(load_preset("shapes").model.pretrained)
    _print(stage.run(recipe, out, workdir, resume=resume, stop_at=stop_at, log=typer.echo))


if __name__ == "__main__":
    main()
