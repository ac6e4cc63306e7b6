"""benchmarks/device_check.sh --smoke: the GPU check's CPU mode on the tiny model, run here so the script cannot rot
(the suite has no GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_smoke_mode_writes_every_measurement(tmp_path):
    out = tmp_path / "check.json"
    child = subprocess.run([str(REPO / "benchmarks" / "device_check.sh"), "--smoke", "--out", str(out)],
                           cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(child.stdout) == result
    assert result["complete"] is True and result["smoke"] is True and result["device"] == "cpu"
    assert result["model"] == "weclip-tiny"
    assert sorted(result["extract"]) == ["bf16", "fp16"]
    for extract in result["extract"].values():
        assert extract["extract_views_per_s"] > 0 and extract["forward_views_per_s"] > 0
        assert extract["ratio"] == pytest.approx(extract["extract_views_per_s"] / extract["forward_views_per_s"])
    train = result["train"]
    assert train["cached_s_per_step"] > 0 and train["online_s_per_step"] > 0
    assert train["cached_peak_mb"] is not None and train["online_peak_mb"] is not None
    reader = result["reader"]
    assert reader["samples"] == reader["steps"] * train["batch"]  # every timed batch is a full one
    consumed = train["batch"] / train["cached_s_per_step"]
    assert reader["train_consumes_samples_per_s"] == pytest.approx(consumed)
    assert reader["headroom"] == pytest.approx(reader["samples_per_s"] / consumed)
    gradcam = result["gradcam"]
    assert gradcam["devices"] == ["cpu", "cpu"] and gradcam["max_abs_diff"] == 0.0 and gradcam["equal"] is True
