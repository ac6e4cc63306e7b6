"""The embedded tiny CLIP: pipeline/model/toy_clip.py, stages/toy_clip.py (`weclip toy-clip`),
pipeline/model_configs/weclip-tiny.json, pipeline/assets/."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from pipeline.files import sha256_file
from pipeline.model.backbone import MODEL_CONFIG_DIR, FrozenCLIP, register_model_configs
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, preset
from pipeline.data import shapes
from pipeline.metrics import average_precision, multi_hot, presence_map
from pipeline.model.text import class_set, prompts
from pipeline.model.toy_clip import (MAX_CHECKPOINT_BYTES, CaptionSpec, ToyClipRecipe, contrastive_loss,
                                     hard_negative, held_out, normalise, presence_scores, sample_caption, save_fp16,
                                     train, truth_matrix)
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


# ---------------------------------------------------------------------------------------------- shipped checkpoint


def test_shipped_checkpoint_is_small_loads_by_path_and_recognises_shapes():
    assert CHECKPOINT.is_file(), f"{CHECKPOINT} missing: rebuild it with the command in its .json"
    assert CHECKPOINT.stat().st_size <= MAX_CHECKPOINT_BYTES
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert record["command"].startswith(".venv/bin/python -m stages.toy_clip")
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
