"""The command line: its error contract (a user error is one `error:` line on stderr and exit code 2, `--debug` shows
its traceback, any other exception keeps its traceback), its conventions (choices, one name per concept, --quiet,
--version, a help that imports no torch), config files and `config show`, and the refusal of URLs for local outputs."""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from typer.testing import CliRunner

from weclip import cli
from weclip.pipeline.config import PRESETS, preset
from weclip.pipeline.errors import CheckpointError, InferError, StorageError
from weclip.pipeline.files import require_local
from tests.data import data_fakes as fk
from tests.stages import eval_fakes as ef

REPO = Path(__file__).resolve().parents[1]


def evaluate_args(tmp_path: Path) -> list[str]:
    return ["evaluate", str(tmp_path / "val.parquet"), "--checkpoint", str(tmp_path / "missing.pt"),
            "-o", str(tmp_path / "eval")]


def test_a_user_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(evaluate_args(tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint ") and "missing.pt does not exist" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # nothing written before the error


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        cli.main(["--debug", *evaluate_args(tmp_path)])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(CheckpointError, match="missing.pt does not exist"):
        cli.main(evaluate_args(tmp_path))


def test_an_unexpected_exception_is_not_dressed_as_a_user_error(tmp_path, monkeypatch):
    from weclip.stages import evaluate

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(evaluate, "run", broken)
    with pytest.raises(KeyError, match="a bug"):
        cli.main(evaluate_args(tmp_path))


def test_the_console_entry_point_exits_2_without_traceback(tmp_path):
    """The real process: stderr holds the error line only, and the exit status is 2."""
    child = subprocess.run([sys.executable, "-c", "import cli; cli.main()", *evaluate_args(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert child.returncode == 2, child.stderr
    assert child.stderr.startswith("error: ") and child.stderr.count("\n") == 1


def test_a_bad_setting_fails_before_any_work(tmp_path, capsys):
    """`--set` values are checked when the config is built: nothing is read or written first."""
    for bad, named in (("refine.rfm_filter=absx", "refine.rfm_filter = 'absx' is not one of 'signed', 'abs'"),
                       ("train.iterations=abc", "train.iterations = 'abc' must be an int")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", "--cache", str(tmp_path / "no-cache"), "-o", str(tmp_path / "run"), "--set", bad])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"error: {named}\n"
        assert not (tmp_path / "run").exists()


def run_cli(args: list[str], cwd: Path | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """`cli.main(args)` in-process: (exit code, stdout, stderr); a user error is exit code 2 and one stderr line."""
    if cwd is not None:
        monkeypatch.chdir(cwd)
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def user_error(args: list[str], capsys) -> str:
    """The stderr line of a command that fails on purpose through `cli.main` (exit code 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def recorder(monkeypatch, module) -> dict:
    """Replace `module.run` by one that records its arguments (and returns a summary-like dict)."""
    seen: dict = {}

    class Summary:
        def to_dict(self):
            return {"recorded": True}

    def run(*args, **kwargs):
        seen.update(args=args, **kwargs)
        return Summary()

    monkeypatch.setattr(module, "run", run)
    return seen


# --- conventions -----------------------------------------------------------------------------------------------

def test_version_is_the_package_version(capsys, monkeypatch):
    import tomllib

    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    code, out, _ = run_cli(["--version"])
    assert code == 0 and out == f"weclip {expected}\n"

    def not_installed(name):
        raise cli.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cli.metadata, "version", not_installed)
    assert cli._version() == expected  # a source checkout that was never installed


@pytest.mark.parametrize("args, choices", [
    (["manifest"], "voc|coco|folder|shapes"),
    (["manifest"], "mask|xml|json"),
    (["extract"], "ray|inline"),
    (["extract"], "voc|coco|shapes"),
    (["train"], "voc|coco|shapes"),
    (["pseudo"], "clip-es|weclip"),
    (["prompts"], "cam|all|labels"),
    (["demo"], "ray|inline"),
    (["config", "show"], "yaml|json"),
])
def test_help_lists_the_choices(args, choices):
    code, out, _ = run_cli([*args, "--help"])
    assert code == 0 and choices in out


def test_a_value_outside_the_choices_is_refused(tmp_path):
    code, _, err = run_cli(["extract", str(tmp_path / "m.parquet"), "-o", str(tmp_path / "c"), "--executor", "dask"])
    assert code == 2 and "dask" in err and "ray" in err


def test_the_choices_are_the_stages_own_names():
    """cli.py spells the names out (their modules import torch); each must equal its source."""
    from weclip.pipeline.data.registry import LAYOUTS, names
    from weclip.pipeline.model import prompts
    from weclip.stages import extract, pseudo

    def values(choice):
        return tuple(member.value for member in choice)

    assert values(cli.Format) == names()
    assert set(values(cli.LabelSource)) == {s for entry in LAYOUTS.values() for s in entry.labels_from}
    assert values(cli.Executor) == typing.get_args(extract.Executor)
    assert values(cli.Source) == pseudo.SOURCES
    assert values(cli.SoftmaxOver) == prompts.SOFTMAX_OVER
    assert values(cli.Preset) == tuple(PRESETS)


def test_help_imports_no_torch():
    """Every `--help` is built from cli.py alone: neither torch, open_clip nor ray is imported (what keeps it fast)."""
    script = (
        "import sys, cli\n"
        "for argv in (['--help'], *[[name, '--help'] for name in "
        "('manifest', 'extract', 'inspect', 'train', 'evaluate', 'infer', 'pseudo', 'prompts', 'plot', 'demo', "
        "'toy-clip')],"
        " ['config', 'show', '--help']):\n"
        "    try:\n"
        "        cli.main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'ray') if m in sys.modules))\n")
    child = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[-1] == "[]"


def test_quiet_turns_progress_off_and_still_prints_the_summary(tmp_path, monkeypatch):
    from weclip.stages import train

    seen = recorder(monkeypatch, train)
    args = ["train", "--cache", str(tmp_path / "cache"), "-o", str(tmp_path / "run")]
    code, out, _ = run_cli(args)
    assert code == 0 and seen["progress"] is True
    code, out, _ = run_cli(["--quiet", *args])
    assert code == 0 and seen["progress"] is False and json.loads(out) == {"recorded": True}


def test_demo_writes_to_out(tmp_path, monkeypatch):
    from weclip.stages import demo

    seen = recorder(monkeypatch, demo)
    code, _, _ = run_cli(["demo", "--quick", "--executor", "inline", "-o", str(tmp_path / "d")])
    assert code == 0 and seen["args"] == (tmp_path / "d",) and seen["executor"] == "inline"
    code, _, _ = run_cli(["demo"])
    assert code == 0 and seen["args"] == (Path("runs/demo"),)  # the Makefile's `make demo`


# --- config files and `config show` -----------------------------------------------------------------------------

def test_a_config_file_lies_between_the_preset_and_set(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  iterations: 1000\n  lr: 1e-3\nrefine:\n  rfm_filter: abs\n"
                         "manifest:\n  decode: header\n")
    cfg = cli._config("coco", ["train.iterations=7"], yaml_file)
    assert (cfg.train.iterations, cfg.train.lr, cfg.refine.rfm_filter) == (7, 1e-3, "abs")
    assert cfg.refine.box_threshold == preset("coco").refine.box_threshold  # the preset's, untouched by the file
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"eval": {"scales": [1.0, 0.5]}}))
    assert cli._config("voc", None, json_file).eval.scales == (1.0, 0.5)


def test_config_show_round_trips_through_a_config_file(tmp_path):
    code, shown, _ = run_cli(["config", "show", "--preset", "coco", "--set", "train.iterations=5",
                              "--set", "manifest.decode=header"])
    assert code == 0 and "iterations: 5" in shown and "decode: header" in shown
    saved = tmp_path / "coco.yaml"
    saved.write_text(shown)
    code, again, _ = run_cli(["config", "show", "--config", str(saved)])  # over the voc preset: the file sets all
    assert code == 0 and again == shown
    code, as_json, _ = run_cli(["config", "show", "--config", str(saved), "--format", "json"])
    data = json.loads(as_json)
    assert data["train"]["iterations"] == 5 and data["manifest"]["decode"] == "header"
    assert data["refine"]["box_threshold"] == 0.7


@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "config file {path} does not exist"),
    ("bad.yaml", "train: [1, 2", "config file {path} is not valid YAML"),
    ("bad.json", "{\"train\": ", "config file {path} is not valid JSON"),
    ("list.yaml", "- 1\n- 2\n", "config file {path} must map section names to fields"),
    ("typo.yaml", "trian:\n  iterations: 3\n", "config file {path}: 'trian' is not a config section"),
    ("field.yaml", "train:\n  iterashuns: 3\n", "config file {path}: 'train.iterashuns' is not a config field"),
    ("value.json", "{\"train\": {\"iterations\": \"many\"}}",
     "config file {path}: train.iterations = 'many' must be an int"),
    ("run.toml", "", "config file {path} must end in .yaml, .yml or .json"),
])
def test_a_bad_config_file_is_one_error_line_naming_it(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    err = user_error(["train", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "run"), "--config", str(path)],
                     capsys)
    assert err.startswith("error: " + message.format(path=path)) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_manifest_takes_its_section_of_the_config_file_and_set(tmp_path, monkeypatch):
    from weclip.stages import manifest

    seen = recorder(monkeypatch, manifest)
    config = tmp_path / "run.yaml"
    config.write_text("manifest:\n  decode: header\ntrain:\n  iterations: 3\n")
    code, _, _ = run_cli(["manifest", "voc", str(tmp_path), "-o", str(tmp_path / "m.parquet"), "--config",
                          str(config), "--set", "manifest.decode_threads=2"])
    assert code == 0 and (seen["cfg"].decode, seen["cfg"].decode_threads) == ("header", 2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny VOC val set, its manifest and a random checkpoint of the tiny test ViT."""
    root = tmp_path_factory.mktemp("cli")
    manifest = ef.make_world(root)
    return {"root": root, "manifest": manifest,
            "checkpoint": ef.make_checkpoint(root / "checkpoint.pt", ef.tiny_config(), manifest)}


def test_set_eval_overrides_the_checkpoints_eval_section(world, tmp_path, monkeypatch, capsys):
    from weclip.stages import evaluate, infer, pseudo

    ckpt = str(world["checkpoint"])
    config = tmp_path / "eval.json"
    config.write_text(json.dumps({"eval": {"flip": False}, "train": {"iterations": 3}}))
    for module, args in ((evaluate, ["evaluate", str(world["manifest"])]), (infer, ["infer", str(tmp_path)])):
        seen = recorder(monkeypatch, module)
        code, _, _ = run_cli([*args, "--checkpoint", ckpt, "-o", str(tmp_path / "o"), "--set", "eval.long_side=96",
                              "--config", str(config)])
        assert code == 0
        assert seen["cfg"] == dataclasses.replace(ef.tiny_config().eval, long_side=96, flip=False)
        seen.clear()
        run_cli([*args, "--checkpoint", ckpt, "-o", str(tmp_path / "o")])
        assert seen["cfg"] is None  # no override: the stage reads the checkpoint's own
    seen = recorder(monkeypatch, pseudo)
    run_cli(["pseudo", str(world["manifest"]), "--source", "weclip", "--checkpoint", ckpt, "-o", str(tmp_path / "p"),
             "--set", "eval.crf=true"])
    assert seen["cfg"].eval.crf is True and seen["cfg"].model == ef.tiny_config().model
    err = user_error(["evaluate", str(world["manifest"]), "--checkpoint", ckpt, "-o", str(tmp_path / "o"),
                      "--set", "train.iterations=3"], capsys)
    assert err.startswith("error: --set 'train.iterations=3': this command takes its config from the checkpoint")


# --- paths and URLs ---------------------------------------------------------------------------------------------

def test_require_local_refuses_urls_and_accepts_file_urls(tmp_path):
    assert require_local("runs/a", "run folder") == Path("runs/a")
    assert require_local(f"file://{tmp_path}/a", "run folder") == tmp_path / "a"
    for url in ("s3://bucket/run", Path("s3://bucket/run"), "gs://b/x", "memory://x"):  # Path() makes s3:/bucket
        with pytest.raises(StorageError, match="run folder .* is a URL, but it must be a local path"):
            require_local(url, "run folder")


@pytest.mark.parametrize("args", [
    ["train", "--cache", "s3://bucket/cache", "-o", "s3://bucket/run"],
    ["evaluate", "val.parquet", "--checkpoint", "c.pt", "-o", "s3://bucket/eval"],
    ["infer", "images", "--checkpoint", "c.pt", "-o", "gs://bucket/out"],
    ["pseudo", "train.parquet", "-o", "s3://bucket/pseudo"],
    ["manifest", "voc", "voc", "-o", "s3://bucket/m.parquet"],
    ["demo", "-o", "s3://bucket/demo"],
])
def test_a_url_for_a_local_output_is_refused_and_nothing_is_created(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    err = user_error(args, capsys)
    assert " is a URL, but it must be a local path" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # no ./s3:/bucket/... folder


def test_infer_accepts_a_single_image_file(world, tmp_path):
    image = tmp_path / "photo.jpg"
    shutil.copy(world["root"] / "voc" / "JPEGImages" / "a.jpg", image)
    code, out, _ = run_cli(["--quiet", "infer", str(image), "--checkpoint", str(world["checkpoint"]),
                            "-o", str(tmp_path / "out"), "--workers", "0"])
    assert code == 0, out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failures.jsonl", "photo.png"]
    assert "segmented 1 of 1 images" in out
    (tmp_path / "notes.txt").write_text("not an image")
    for path, message in ((tmp_path / "notes.txt", "is not an image file"), (tmp_path / "nope.jpg", "does not exist")):
        with pytest.raises(InferError, match=message):
            run_cli(["infer", str(path), "--checkpoint", str(world["checkpoint"]), "-o", str(tmp_path / "o")])


def test_a_relative_list_file_is_read_from_the_current_directory(tmp_path, monkeypatch):
    root = fk.make_voc(tmp_path / "voc", {"x": ([8], []), "y": ([15], []), "z": ([3], [])})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "two.txt").write_text("x\nz\n")
    code, out, _ = run_cli(["--quiet", "manifest", "voc", str(root), "--split", "train", "--list-file", "two.txt",
                            "-o", str(tmp_path / "m.parquet")], cwd=elsewhere, monkeypatch=monkeypatch)
    assert code == 0, out
    assert json.loads(out)["images"] == 2
