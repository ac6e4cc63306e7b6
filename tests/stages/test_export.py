"""stages/export.py and the weights-only form of pipeline/training/checkpoint.py: `weclip export` writes a safetensors
file that load_checkpoint, evaluate and infer read like the checkpoint it came from."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from weclip import cli
from tests.stages import eval_fakes as ef

from weclip.pipeline.errors import CheckpointError
from weclip.pipeline.training.checkpoint import load_checkpoint
from weclip.stages import evaluate, export


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = ef.tiny_config()
    manifest = ef.make_world(root)
    checkpoint = ef.make_checkpoint(root / "checkpoint.pt", cfg, manifest)
    summary = export.run(checkpoint, root / "model.safetensors")
    return {"root": root, "manifest": manifest, "checkpoint": checkpoint, "export": root / "model.safetensors",
            "summary": summary}


def test_the_export_holds_what_inference_reads_and_no_training_state(world):
    full, weights = load_checkpoint(world["checkpoint"]), load_checkpoint(world["export"])
    assert weights.weights_only and not full.weights_only
    assert (weights.step, weights.config, weights.fingerprint, weights.class_names, weights.decoder_args) == \
        (full.step, full.config, full.fingerprint, full.class_names, full.decoder_args)
    assert weights.decoder_state.keys() == full.decoder_state.keys()
    assert all(torch.equal(weights.decoder_state[k], full.decoder_state[k]) for k in full.decoder_state)
    assert weights.optimizer_state == weights.scheduler_state == weights.rng_state == {}
    summary = world["summary"]
    assert summary.step == 7 and summary.tensors == len(full.decoder_state)
    assert 0 < summary.bytes < world["checkpoint"].stat().st_size  # no optimizer moments
    assert [p.name for p in world["root"].glob(".model*")] == []  # written atomically, no temp file left


def test_evaluate_on_the_export_gives_the_report_of_the_checkpoint(world):
    def report(checkpoint, out):
        return evaluate.run(checkpoint, world["manifest"], world["root"] / out, crf=False, progress=False,
                            model_configs=[ef.TINY_CONFIG]).to_dict()

    a, b = report(world["checkpoint"], "from-checkpoint"), report(world["export"], "from-export")
    for key in ("step", "images", "miou", "pixel_accuracy", "pixels", "iou", "gt_pixels", "confusion", "eval"):
        assert a[key] == b[key], key


def test_the_cli_exports(world, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # typer exits, 0 on success
        cli.main(["export", str(world["checkpoint"]), "-o", str(tmp_path / "m.safetensors")])
    assert exit_info.value.code == 0
    assert "step 7" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "m.safetensors").weights_only


def test_foreign_damaged_and_self_overwriting_exports_are_refused(world, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors is a safetensors file but not a weclip"):
        load_checkpoint(foreign)
    truncated = tmp_path / "truncated.safetensors"
    data = world["export"].read_bytes()
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="is the checkpoint itself"):
        export.run(world["checkpoint"], world["checkpoint"])
