"""The embedded tiny CLIP: pipeline/model/toy_clip.py, stages/toy_clip.py (`weclip toy-clip`),
pipeline/model_configs/weclip-tiny.json, pipeline/assets/."""
from __future__ import annotations

import ast
import json
import shlex
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from weclip.cli import app
from weclip.pipeline.files import sha256_file
from weclip.pipeline.model.backbone import MODEL_CONFIG_DIR, FrozenCLIP, register_model_configs
from weclip.pipeline.config import IMAGENET_MEAN, IMAGENET_STD, preset
from weclip.pipeline.data import shapes
from weclip.pipeline.errors import ConfigError
from weclip.pipeline.metrics import average_precision, multi_hot, presence_map
from weclip.pipeline.model.text import class_set, prompts
from weclip.pipeline.files import REPO_ROOT, repo_relative
from weclip.pipeline.model.toy_clip import (MAX_CHECKPOINT_BYTES, CaptionSpec, ToyClipRecipe, contrastive_loss,
                                     hard_negative, held_out, learning_rate, normalise, patch_dropout_at,
                                     presence_scores, sample_caption, save_fp16, train, truth_matrix)
from weclip.stages import toy_clip as stage
from tests.bench import load_benchmark

TESTS = Path(__file__).resolve().parents[1]
CHECKPOINT = Path(preset("shapes").model.pretrained)


# ---------------------------------------------------------------------------------------------- maths


def test_contrastive_loss_with_one_positive_per_row_is_clips_loss():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale = torch.tensor(7.0)
    logits = scale * img @ txt.T
    clip = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    ours = contrastive_loss(img, txt, scale, torch.eye(5, dtype=torch.bool), paired=5)
    torch.testing.assert_close(ours, clip)


def test_contrastive_loss_multi_positive_and_hard_negatives_by_hand():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(3, 4), dim=-1), F.normalize(torch.randn(5, 4), dim=-1)
    truth = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)  # texts 3, 4: negatives
    scale = torch.tensor(3.0)
    logits = (scale * img @ txt.T).double()
    i2t = []
    for b in range(3):
        pos = truth[b].nonzero().flatten().tolist()
        log_p = logits[b] - torch.logsumexp(logits[b], 0)
        i2t.append(-sum(log_p[t] for t in pos) / len(pos))
    t2i = []
    for t in range(3):
        pos = truth[:, t].nonzero().flatten().tolist()
        log_p = logits[:, t] - torch.logsumexp(logits[:, t], 0)
        t2i.append(-sum(log_p[b] for b in pos) / len(pos))
    expected = (sum(i2t) / 3 + sum(t2i) / 3) / 2
    ours = contrastive_loss(img, txt, scale, truth, paired=3)
    torch.testing.assert_close(ours.double(), expected.reshape(()), rtol=1e-5, atol=1e-6)


def test_caption_truth():
    assert CaptionSpec((0, 2), 1).true_of((0, 1, 2), 1)
    assert not CaptionSpec((0, 2), 1).true_of((0, 1, 2), 3)  # wrong background
    assert not CaptionSpec((0, 4), None).true_of((0, 1, 2), 3)  # an absent object
    assert CaptionSpec((), 3).true_of((5,), 3)
    assert CaptionSpec((1, 0), 2).text("a photo of {}.") == "a photo of a star and a ball on water."
    truth = truth_matrix([CaptionSpec((0,), None), CaptionSpec((), 2)], [(0, 1), (1,)], [2, 2])
    assert truth.tolist() == [[True, True], [False, True]]


def test_sampled_captions_are_true_and_hard_negatives_false():
    rng = np.random.default_rng(0)
    kinds = set()
    for s in shapes.iter_samples(4, 64, "{}", count=30):
        for _ in range(5):
            spec = sample_caption(rng, s.labels, s.background, ToyClipRecipe().caption_mix)
            negative = hard_negative(rng, spec, s.labels, s.background, 6, 6)
            assert spec.true_of(s.labels, s.background)
            assert not negative.true_of(s.labels, s.background)
            kinds.add((len(spec.objects) > 0, spec.background is not None))
    assert kinds == {(True, True), (True, False), (False, True)}


def test_average_precision_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert average_precision(scores, positives) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(scores[::-1], positives[::-1]) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    labels = np.array([[1, 0], [0, 1], [1, 1]], dtype=bool)
    perfect = labels.astype(float)
    assert presence_map(perfect, labels) == 1.0
    assert presence_map(1 - perfect, labels) < 1.0


def test_normalise_is_imagenet_on_the_0_255_scale():
    images = torch.randint(0, 256, (2, 5, 6, 3), dtype=torch.uint8)
    out = normalise(images)
    assert out.shape == (2, 3, 5, 6)
    for c in range(3):
        expected = (images[..., c].float() - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], expected)


def test_multi_hot_and_a_class_without_positives():
    assert multi_hot([(0, 2), (), (1,)], 3).tolist() == [[True, False, True], [False, False, False],
                                                          [False, True, False]]
    assert np.isnan(average_precision(np.array([0.3, 0.1]), np.array([False, False])))
    labels = np.array([[1, 0], [0, 0], [1, 0]], dtype=bool)  # class 1 has no positive: left out of the mean
    assert presence_map(np.array([[0.9, 0.0], [0.5, 1.0], [0.1, 0.2]]), labels) == pytest.approx((1 + 2 / 3) / 2)


def test_learning_rate_and_patch_dropout_schedules():
    recipe = ToyClipRecipe(steps=10, warmup_steps=2, lr=1.0, min_lr=0.0, patch_dropout=0.5, unmasked_fraction=0.3)
    assert [learning_rate(recipe, k) for k in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert learning_rate(recipe, 6) == pytest.approx(0.5)  # half-way through the cosine
    assert [patch_dropout_at(recipe, k) for k in (0, 6, 7, 9)] == [0.5, 0.5, 0.0, 0.0]  # last 3 of 10 steps unmasked
    with pytest.raises(ConfigError, match="patch_dropout 1.0"):
        ToyClipRecipe(patch_dropout=1.0)


# ---------------------------------------------------------------------------------------------- model config


def test_model_config_registers_and_round_trips(tmp_path):
    register_model_configs()
    assert "weclip-tiny" in open_clip.list_models()
    assert open_clip.get_model_config("weclip-tiny") == json.loads((MODEL_CONFIG_DIR / "weclip-tiny.json").read_text())
    torch.manual_seed(0)
    model = open_clip.create_model("weclip-tiny").eval()
    path = tmp_path / "tiny.pt"
    save_fp16(model, path)
    reloaded = open_clip.create_model("weclip-tiny", pretrained=str(path)).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(b, a.half().to(b.dtype), msg=name)
    # the training forward (open_clip, pool_type 'avg') is the pooling the CAM uses (FrozenCLIP.pooled_embedding)
    backbone = FrozenCLIP.load("weclip-tiny", str(path))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(backbone.encode_image(images), F.normalize(reloaded.encode_image(images), dim=-1),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- training loop


def test_training_resumes_bit_for_bit(tmp_path):
    register_model_configs(TESTS / "tiny-vit.json")
    recipe = ToyClipRecipe(model="tiny-vit", image_size=64, steps=4, batch_size=4, warmup_steps=1, val_count=4,
                           eval_every=2, save_every=2)
    straight = train(recipe, tmp_path / "a", log=lambda line: None)
    assert straight.step == 4 and [h["step"] for h in straight.history] == [2, 4]
    assert all(np.isfinite(h["loss"]) and 0 <= h["presence_map"] <= 1 for h in straight.history)
    assert train(recipe, tmp_path / "b", stop_at=2, log=lambda line: None).step == 2
    resumed = train(recipe, tmp_path / "b", resume=True, log=lambda line: None)
    assert resumed.step == 4
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="another recipe"):
        train(replace(recipe, lr=1e-4), tmp_path / "b", resume=True, log=lambda line: None)


# ---------------------------------------------------------------------------------------------- stage and command line


def test_stage_stops_resumes_and_ships_the_trained_weights_in_float16(tmp_path):
    register_model_configs(TESTS / "tiny-vit.json")
    recipe = ToyClipRecipe(model="tiny-vit", image_size=64, steps=4, batch_size=4, warmup_steps=1, val_count=4,
                           eval_every=2, save_every=2)
    out = tmp_path / "ship" / "tiny.pt"
    stopped = stage.run(recipe, out, tmp_path / "work", stop_at=2, log=lambda line: None)
    assert (stopped.step, stopped.checkpoint) == (2, None)
    assert stopped.format() == "stopped after step 2 of 4; continue with --resume"
    assert not out.parent.exists()
    summary = stage.run(recipe, out, tmp_path / "work", resume=True, log=lambda line: None)
    assert (summary.step, summary.checkpoint, summary.bytes) == (4, out, out.stat().st_size)
    straight = train(recipe, tmp_path / "straight", log=lambda line: None).model
    shipped = torch.load(out)
    for name, tensor in straight.state_dict().items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(shipped[name], expected, rtol=0, atol=0, msg=name)
    model = open_clip.create_model("tiny-vit", pretrained=str(out)).eval()
    images, labels = held_out(recipe.val_seed, 4, 64, recipe.template)
    expected_map = presence_map(presence_scores(model, open_clip.get_tokenizer("tiny-vit"), images, recipe.template),
                                multi_hot(labels, 6))
    record = json.loads(summary.record.read_text())
    assert summary.record == out.with_suffix(".json")
    assert record["presence_map_fp16"] == summary.presence_map == expected_map
    assert (record["checkpoint"], record["sha256"], record["bytes"]) == ("tiny.pt", sha256_file(out), summary.bytes)
    assert record["recipe"] == json.loads(json.dumps(asdict(recipe)))
    assert record["command"] is None  # model and image size are not options of `weclip toy-clip`
    assert [h["step"] for h in record["history"]] == [2, 4]


def _recipe_of_command(command: str, monkeypatch) -> tuple[ToyClipRecipe, Path]:
    """Run a recorded `weclip toy-clip ...` line through the CLI, with the stage's run replaced by a recorder."""
    seen = {}

    def record_run(recipe, out, workdir, resume, stop_at, log):
        seen.update(recipe=recipe, out=out)
        return stage.ToyClipSummary(0, recipe.steps)

    monkeypatch.setattr(stage, "run", record_run)
    words = shlex.split(command)
    assert words[:2] == ["weclip", "toy-clip"]
    result = CliRunner().invoke(app, words[1:])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return seen["recipe"], seen["out"]


def test_shipped_command_rebuilds_the_recorded_recipe(monkeypatch):
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    recipe, out = _recipe_of_command(record["command"], monkeypatch)
    assert json.loads(json.dumps(asdict(recipe))) == record["recipe"]
    assert (REPO_ROOT / out).resolve() == CHECKPOINT.resolve() and not out.is_absolute()
    assert record["command"] == stage.rebuild_command(recipe, CHECKPOINT)


def test_rebuild_command_round_trips_every_option_through_the_cli(tmp_path, monkeypatch):
    changed = {"seed": 3, "steps": 7, "batch_size": 5, "lr": 1.25e-3, "warmup_steps": 2, "weight_decay": 0.05,
               "patch_dropout": 0.25, "unmasked_fraction": 0.2, "val_count": 9, "eval_every": 3, "threads": 2,
               "hard_negatives": False}
    assert set(changed) == set(stage.CLI_FIELDS + stage.CLI_FLAGS)
    recipe = ToyClipRecipe(**changed)
    assert all(getattr(recipe, k) != getattr(ToyClipRecipe(), k) for k in changed)
    out = tmp_path / "x.pt"
    command = stage.rebuild_command(recipe, out)
    assert f"--out={out}" in command and "--no-hard-negatives" in command
    assert _recipe_of_command(command, monkeypatch) == (recipe, out)
    assert _recipe_of_command("weclip toy-clip", monkeypatch) == (ToyClipRecipe(), CHECKPOINT)
    assert stage.rebuild_command(replace(recipe, image_size=64), out) is None


def test_repo_relative_paths():
    assert repo_relative(CHECKPOINT) == "pipeline/assets/weclip-tiny.pt"
    assert repo_relative("/elsewhere/tiny.pt") == "/elsewhere/tiny.pt"


def test_stage_composes_library_parts_only():
    tree = ast.parse(Path(stage.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name.split(".")[0] in ("stages", "argparse")}


# ---------------------------------------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_is_small_loads_by_path_and_recognises_shapes():
    assert CHECKPOINT.is_file(), f"{CHECKPOINT} missing: rebuild it with the command in its .json"
    assert CHECKPOINT.stat().st_size <= MAX_CHECKPOINT_BYTES
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert record["command"].startswith("weclip toy-clip ")
    assert record["sha256"] == sha256_file(CHECKPOINT), "the record describes another checkpoint"
    register_model_configs()
    model = open_clip.create_model("weclip-tiny", pretrained=str(CHECKPOINT)).eval()
    backbone = FrozenCLIP.load("weclip-tiny", str(CHECKPOINT))
    template = preset("shapes").text.template
    images, labels = held_out(seed=77, count=30, size=224, template=template)
    truth = multi_hot(labels, 6)
    score = presence_map(presence_scores(model, open_clip.get_tokenizer("weclip-tiny"), images, template), truth)
    chance = truth.mean()  # a random ranking's expected AP is about the positive rate
    assert score > max(0.8, chance + 0.4)
    # the frozen backbone (the extraction path) ranks the same way
    text = backbone.encode_text(prompts(class_set("shapes").prompt_names, template))
    frozen_scores = (backbone.encode_image(normalise(images)) @ text.T).numpy()
    assert presence_map(frozen_scores, truth) == pytest.approx(score, abs=1e-3)


def test_shipped_record_names_no_path_of_the_machine_it_was_made_on():
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    words = [w for text in strings(record) for w in shlex.split(text)]
    assert not [w for w in words if Path(w.partition("=")[2] or w).is_absolute()]
    assert record["quality"]["checkpoint"] == "pipeline/assets/weclip-tiny.pt"
    assert record["quality"]["sha256"] == record["sha256"]


def test_quality_benchmark_runs_on_the_shipped_checkpoint(tmp_path):
    """benchmarks/shapes_quality.py end to end on a few images: every method scored, CAMs beat all-background."""
    shapes_quality = load_benchmark("shapes_quality")

    cfg = preset("shapes")
    ids = shapes.generate(tmp_path, "val", 6, seed=2024, size=224, template=cfg.text.template)
    result = shapes_quality.evaluate(cfg, tmp_path, ids, batch_size=6)
    assert set(result["miou"]) == {"all_bg", "cam", "caa", "caa_par", "caa_crf"}
    assert 0.5 < result["presence_map"] <= 1
    assert result["miou"]["cam"] > result["miou"]["all_bg"] + 10


def test_quality_train_study_runs_end_to_end_and_resumes(tmp_path):
    """shapes_quality --train on a few images and steps: every decoder entry scored, views from one cache, and a
    rerun reuses the trained runs and their scores."""
    shapes_quality = load_benchmark("shapes_quality")

    cfg = preset("shapes").replace(train={"iterations": 4, "checkpoint_every": 4, "batch_size": 2},
                                   refine={"rfm_start_iter": 2}, eval={"long_side": 224, "scales": [1.0]})
    val = shapes_quality.shapes_dataset(tmp_path / "val" / "data", "val", 3, 2024, 224)
    study = shapes_quality.train_study(cfg, tmp_path, val, views=[1, 2], seeds=[1], train_images=6, online=True,
                                       progress=False)
    assert set(study["decoders"]) == {"weclip", "weclip_no_rfm", "weclip_online"}
    assert study["decoders"]["weclip"] == study["views"][cfg.extract.views]  # the preset's views are `weclip`
    runs = {r["name"]: r for r in study["train_runs"]}
    assert set(runs) == {"views_1", "views_2", "weclip_no_rfm", "weclip_online"}
    assert all(r["steps"] == 4 and 0 <= r["miou"] <= 100 for r in runs.values())
    def rfm_flags(run: str) -> list[bool]:
        return [json.loads(line)["rfm"] for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    assert rfm_flags("views_2-seed1") == [False, False, True, True]
    assert rfm_flags("weclip_no_rfm-seed1") == [False] * 4
    again = shapes_quality.train_study(cfg, tmp_path, val, views=[1, 2], seeds=[1], train_images=6, online=True,
                                       progress=False)
    assert again["train_runs"] == study["train_runs"]
