"""stages/prompts.py (and `weclip prompts`) on the tiny fake VOC tree: sharpness recomputed here from the image and
text embeddings, raw-CAM mIoU from the released-style Grad-CAM loop, the ranked CSV / JSON table, bad inputs."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from tests.stages import eval_fakes as ef
from tests.test_cli import run_cli, user_error

from weclip.pipeline.config import IMAGENET_MEAN, IMAGENET_STD
from weclip.pipeline.data.images import load_mask, load_rgb
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import ConfigError, EvalError
from weclip.pipeline.inference.prompt_search import score_templates
from weclip.pipeline.inference.segment import clipes_input
from weclip.pipeline.metrics import ConfusionMatrix
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.cam import softmax_gradcam_loop
from weclip.pipeline.model.text import TextEmbeddings, class_set
from weclip.pipeline.refinement.refine import cams_to_labels, upsample_cams
from weclip.stages import prompts

TEMPLATES = ("a photo of a {}.", "a clean origami {}.", "art of the {}.")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompts")
    # the ImageNet statistics of the tiny config, so that the recomputation below can normalise by hand
    cfg = ef.tiny_config(eval={"clipes_normalisation": "imagenet"})
    templates = root / "templates.txt"
    templates.write_text("# three candidates\n" + "\n".join(TEMPLATES) + "\n")
    return {"root": root, "cfg": cfg, "manifest": ef.make_world(root), "templates": templates}


@pytest.fixture(scope="module")
def report(world):
    return prompts.run(world["cfg"], world["manifest"], world["templates"], world["root"] / "table.json",
                       cam_miou=True, progress=False, model_configs=[ef.TINY_CONFIG])


def _inputs(world):
    """(rgb, network input, labels, mask) per image, the input made here: bicubic to multiples of 16, ImageNet stats."""
    data = read_manifest(world["manifest"])
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    for row in data.rows:
        rgb = load_rgb(data.image_abspath(row))
        x = (torch.from_numpy(np.array(clipes_input(rgb, 16))).permute(2, 0, 1).float() - mean) / std
        yield rgb, x[None], list(row.labels), load_mask(data.mask_abspath(row))


def test_sharpness_and_cam_miou_match_a_recomputation(world, report):
    cfg = world["cfg"]
    backbone = load_backbone(cfg.model, "cpu", (ef.TINY_CONFIG,))
    names = class_set("voc")
    expected = {}
    for template in TEMPLATES:
        fg = backbone.encode_text([template.format(n) for n in names.prompt_names])
        bg = backbone.encode_text([template.format(n) for n in names.background])
        variances, means = [], []
        cm = ConfusionMatrix(names.num_classes + 1)
        for rgb, x, labels, mask in _inputs(world):
            emb = backbone.encode_image(x)[0]
            logits = backbone.logit_scale * torch.cat([fg[labels] @ emb, bg @ emb])
            s = (logits.double().exp() / logits.double().exp().sum())[:len(labels)].numpy()
            variances.append(((s - s.mean()) ** 2).mean())
            means.append(s.mean())
            cams = softmax_gradcam_loop(backbone, x, [labels], TextEmbeddings(fg, bg), (), ())
            cm.update(cams_to_labels(upsample_cams(cams.cams, rgb.shape[:2]), cams.cam_classes)[0], mask)
        expected[template] = (sum(variances) / sum(means), cm.miou())
    assert report.images == len(ef.IMAGES) and report.softmax == "cam"
    assert [s.template for s in report.scores] == sorted(TEMPLATES, key=lambda t: expected[t][0])
    for score in report.scores:
        assert score.sharpness == pytest.approx(expected[score.template][0], rel=1e-4)
        assert score.cam_miou == pytest.approx(expected[score.template][1], abs=1e-9)


def test_json_table_holds_the_report_and_a_correlation(world, report):
    saved = json.loads((world["root"] / "table.json").read_text())
    assert [s["template"] for s in saved["scores"]] == [s.template for s in report.scores]
    assert saved["spearman"] == report.spearman
    assert report.spearman is None or -1 <= report.spearman <= 1
    text = report.format()
    assert "Spearman" in text and all(t in text for t in TEMPLATES)


def test_csv_table_without_masks_needed(world, report):
    out = world["root"] / "table.csv"
    plain = prompts.run(world["cfg"], world["manifest"], world["templates"], out, progress=False,
                        model_configs=[ef.TINY_CONFIG])
    rows = list(csv.DictReader(out.open()))
    assert [r["template"] for r in rows] == [s.template for s in report.scores]
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and all(r["cam_miou"] == "" for r in rows)
    assert [float(r["sharpness"]) for r in rows] == [s.sharpness for s in plain.scores]
    assert plain.spearman is None and "Spearman" not in plain.format()


def test_the_softmax_set_changes_the_score(world, report):
    other = prompts.run(world["cfg"].replace(text={"sharpness_softmax": "all"}), world["manifest"],
                        world["templates"], progress=False, model_configs=[ef.TINY_CONFIG])
    assert other.softmax == "all"
    assert {s.template: s.sharpness for s in other.scores} != {s.template: s.sharpness for s in report.scores}


def _with_column(data, name, values):
    """The manifest `data` with one column of its table replaced."""
    table = data.table
    column = pa.array(values, type=table.schema.field(name).type)
    return dataclasses.replace(data, table=table.set_column(table.schema.get_field_index(name), name, column))


def test_cam_miou_needs_masks_labels_are_needed_and_the_table_a_known_suffix(world, tmp_path):
    data, cfg, cpu = read_manifest(world["manifest"]), world["cfg"], torch.device("cpu")
    unmasked = _with_column(data, "mask_path", [None] * len(data))
    with pytest.raises(EvalError, match="without a mask"):
        score_templates(cfg, unmasked, TEMPLATES, cpu, cam_miou=True, model_configs=[ef.TINY_CONFIG])
    assert score_templates(cfg, unmasked, TEMPLATES[:1], cpu, model_configs=[ef.TINY_CONFIG]).images == len(data)
    with pytest.raises(EvalError, match="no image with a class label"):
        score_templates(cfg, _with_column(data, "labels", [[]] * len(data)), TEMPLATES, cpu)
    partly = _with_column(data, "labels", [[]] + [list(r.labels) for r in data.rows[1:]])
    result = score_templates(cfg, partly, TEMPLATES[:1], cpu, model_configs=[ef.TINY_CONFIG])
    assert result.images == len(data) - 1 and result.unlabelled == (data.rows[0].image_id,)
    with pytest.raises(ConfigError, match=r"\.csv or \.json"):
        prompts.run(cfg, world["manifest"], world["templates"], tmp_path / "table.txt", progress=False)


def test_cli_bad_templates_file_is_one_error_line(world, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of a dog\n")
    err = user_error(["prompts", str(world["manifest"]), "--templates", str(bad)], capsys)
    assert err.startswith("error: ") and err.count("\n") == 1 and f"{bad}, line 2" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    err = user_error(["prompts", str(world["manifest"]), "--templates", str(empty)], capsys)
    assert f"templates file {empty} holds no template" in err and err.count("\n") == 1


def test_cli_writes_the_table_with_the_softmax_asked_for(world, tmp_path):
    out = tmp_path / "table.csv"
    code, stdout, _ = run_cli(["prompts", str(world["manifest"]), "--templates", str(world["templates"]), "-o",
                               str(out), "--softmax", "labels", "--set", "model.name=tiny-vit",
                               "--set", "model.pretrained=null"])
    assert code == 0 and "softmax over labels" in stdout and f"table written to {out}" in stdout
    assert [r["template"] for r in csv.DictReader(out.open())] == [
        line.split("|")[2].strip() for line in stdout.splitlines() if line.startswith("|") and line[2:6].strip().isdigit()]
