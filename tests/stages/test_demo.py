"""`weclip demo --quick` end to end through the CLI, with the shipped tiny CLIP (the README's first command, small)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from weclip.cli import app
from weclip.pipeline.cache.store import CacheReader


def test_demo_quick_runs_every_stage_and_prints_the_table(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--executor", "inline", "--out", str(workdir)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    rows = re.findall(r"^\| (.+?)\s+\|\s+([0-9.]+) \|$", result.output, flags=re.M)
    assert len(rows) == 3, result.output
    for _, value in rows:
        assert 0.0 < float(value) <= 100.0
    # every stage left its output: a committed cache, a checkpoint, the reports
    reader = CacheReader(workdir / "cache")
    assert reader.verify() == {} and reader.index.num_rows > 0
    assert (workdir / "train" / "checkpoint.pt").is_file()
    report = json.loads((workdir / "eval" / "report.json").read_text())
    assert report["images"] == 8
    assert (workdir / "eval" / "visualize.png").is_file()
