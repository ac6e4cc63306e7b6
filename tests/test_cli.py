"""The command line's error contract: a user error is one `error:` line on stderr and exit code 2, `--debug` shows
its traceback, and any other exception keeps its traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import cli
from pipeline.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def evaluate_args(tmp_path: Path) -> list[str]:
    return ["evaluate", str(tmp_path / "missing.pt"), str(tmp_path / "val.parquet"), "-o", str(tmp_path / "eval")]


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
    from stages import evaluate

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
