"""The user's path end to end: settings given to `extract` travel through the cache to `train` and through the
checkpoint to `evaluate`, with a non-default backbone given by a local checkpoint file; and a dataset with its own
classes runs through the whole chain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from weclip import cli
from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import ConfigError, EvalError
from weclip.pipeline.model.text import VOC_BACKGROUND, text_embeddings
from weclip.pipeline.training.checkpoint import load_checkpoint
from weclip.stages import evaluate, train
from tests.conftest import TINY_NAME, build_tiny_backbone
from tests.data import data_fakes as fk

EXTRACT_SETS = ["model.name=tiny-vit", "aug.crop=48", "extract.views=1", "extract.samples_per_shard=4",
                "extract.batch_size=2", "extract.feature_layers=[1,2]", "extract.attn_layers=[1,2,3]"]
# training settings only: none of them repeats what extract was given
TRAIN_SETS = ["train.iterations=3", "train.batch_size=2", "train.checkpoint_every=3", "train.loader_workers=0",
              "train.warmup_iters=1", "refine.static_layers=2", "refine.rfm_layers=2", "refine.rfm_start_iter=2",
              "decoder.embed_dim=32", "decoder.mlp_dim=64", "decoder.layers=1", "decoder.heads=2"]


def weclip(*args: str) -> None:
    """`weclip ARGS` in this process; a user error fails the test with its message."""
    try:
        cli.main([str(a) for a in args])
    except SystemExit as done:
        assert done.code in (0, None), f"weclip {' '.join(map(str, args))} exited {done.code}"


def sets(items: list[str]) -> list[str]:
    return [part for item in items for part in ("--set", item)]


def tiny_weights(path: Path, seed: int) -> Path:
    """A local checkpoint file of the tiny test ViT (a state dict), as a user would download one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(build_tiny_backbone(seed).model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    """The README's real-data sequence on a small fake VOC tree: manifest → extract → train, through the CLI."""
    root = tmp_path_factory.mktemp("user_path")
    voc = root / "VOC2012"
    items = {f"img{i}": ([v, w], []) for i, (v, w) in enumerate([(1, 15), (8, 12), (3, 15), (12, 20), (5, 9)])}
    fk.make_voc(voc, items, split="train", size=(40, 56))
    fk.make_voc(voc, dict(list(items.items())[:2]), split="val", size=(40, 56))
    weights = tiny_weights(root / "models" / "tiny.pt", seed=5)
    weclip("manifest", "voc", voc, "--split", "train", "-o", root / "train.parquet")
    weclip("manifest", "voc", voc, "--split", "val", "-o", root / "val.parquet")
    weclip("extract", root / "train.parquet", "-o", root / "cache", "--executor", "inline",
           *sets(EXTRACT_SETS + [f"model.pretrained={weights}"]))
    weclip("train", "--cache", root / "cache", "-o", root / "run", *sets(TRAIN_SETS))
    return {"root": root, "weights": weights}


def test_train_takes_the_backbone_and_layers_from_the_cache(voc_run):
    root = voc_run["root"]
    ckpt = load_checkpoint(root / "run" / "checkpoint.pt")
    assert (ckpt.config.model.name, ckpt.config.model.pretrained) == (TINY_NAME, str(voc_run["weights"]))
    assert ckpt.config.extract.feature_layers == (1, 2) and ckpt.config.aug.crop == 48
    assert ckpt.config.train.iterations == 3 and ckpt.step == 3
    cache_cfg = json.loads((root / "cache" / "config.json").read_text())
    assert cache_cfg["model"] == ckpt.config.to_dict()["model"]  # the cache's readable config, inherited
    run_cfg = json.loads((root / "run" / "config.json").read_text())
    assert run_cfg == json.loads(json.dumps(ckpt.config.to_dict()))
    assert ckpt.fingerprint == CacheReader(root / "cache").fingerprint


def test_evaluate_loads_the_recorded_backbone(voc_run):
    root = voc_run["root"]
    weclip("evaluate", root / "val.parquet", "--checkpoint", root / "run" / "checkpoint.pt", "-o", root / "eval",
           "--no-crf")
    report = json.loads((root / "eval" / "report.json").read_text())
    assert report["images"] == 2 and 0 <= report["miou"] <= 1


def test_a_setting_that_contradicts_the_cache_is_refused(voc_run, tmp_path, capsys):
    root = voc_run["root"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--cache", str(root / "cache"), "-o", str(tmp_path / "run"),
                  *sets(TRAIN_SETS + ["extract.feature_layers=[1]"])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "extract.feature_layers = (1, 2), but this run asks for (1,)" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    # the same value as the cache's is no contradiction
    same = train.run(train_cfg(root), root / "cache", tmp_path / "same", progress=False,
                     explicit=["extract.feature_layers"])
    assert same.final_step == 3


def train_cfg(root: Path):
    """The config the CLI run trained with (the cache's settings and TRAIN_SETS)."""
    return load_checkpoint(root / "run" / "checkpoint.pt").config


def test_a_moved_backbone_is_found_again_and_checked_by_its_sha256(voc_run, tmp_path):
    root = voc_run["root"]
    moved = tmp_path / "elsewhere" / "tiny.pt"
    moved.parent.mkdir()
    moved.write_bytes(voc_run["weights"].read_bytes())
    voc_run["weights"].rename(tmp_path / "gone.pt")
    try:
        with pytest.raises(EvalError, match=r"--set model.pretrained=PATH"):
            evaluate.run(root / "run" / "checkpoint.pt", root / "val.parquet", tmp_path / "e1", progress=False)
        report = evaluate.run(root / "run" / "checkpoint.pt", root / "val.parquet", tmp_path / "e2", progress=False,
                              pretrained=str(moved))
        assert report.images == 2
        other = tiny_weights(tmp_path / "other.pt", seed=6)  # other weights of the same architecture
        with pytest.raises(EvalError, match="was trained on features of backbone"):
            evaluate.run(root / "run" / "checkpoint.pt", root / "val.parquet", tmp_path / "e3", progress=False,
                         pretrained=str(other))
        cfg = train_cfg(root).replace(model={"pretrained": str(other)})
        with pytest.raises(ConfigError, match="holds other weights"):
            train.run(cfg, root / "cache", tmp_path / "r", progress=False, explicit=["model.pretrained"])
    finally:
        (tmp_path / "gone.pt").rename(voc_run["weights"])


def test_a_dataset_with_its_own_classes_runs_through_the_chain(tmp_path):
    """3 classes of a folder dataset (one with its own prompt), the VOC preset's settings otherwise: the manifest
    carries the class names, the cache prompts them, and train, evaluate and pseudo take them from there."""
    root = tmp_path / "fruit"
    lines, rows = [], []
    for i, labels in enumerate([[1], [2, 3], [3], [1, 2]]):
        name = f"im{i}"
        fk.write_image(root / f"{name}.jpg", fk.rgb(40, 56, i))
        fk.write_mask(root / f"{name}.png", fk.mask_with(40, 56, labels), palette=False)
        rows.append(f"{name}.jpg,{';'.join(['apple', 'pear', 'plum'][v - 1] for v in labels)},{name}.png")
    (root / "labels.csv").write_text("image,labels,mask\n" + "\n".join(rows) + "\n")
    (tmp_path / "classes.txt").write_text("apple\npear: a ripe pear\nplum\n")
    weclip("manifest", "folder", root, "--labels-file", root / "labels.csv", "--class-names-file",
           tmp_path / "classes.txt", "-o", tmp_path / "fruit.parquet")
    manifest = read_manifest(tmp_path / "fruit.parquet")
    assert manifest.class_names == ("apple", "pear", "plum") and manifest.class_prompts == ("apple", "a ripe pear",
                                                                                            "plum")
    weclip("extract", tmp_path / "fruit.parquet", "-o", tmp_path / "cache", "--executor", "inline",
           *sets(EXTRACT_SETS + ["model.pretrained=null"]))
    provenance = CacheReader(tmp_path / "cache").provenance
    assert provenance["class_set"] == {"name": "custom", "classes": ["apple", "pear", "plum"],
                                       "prompt_names": ["apple", "a ripe pear", "plum"],
                                       "background": list(VOC_BACKGROUND)}
    weclip("train", "--cache", tmp_path / "cache", "-o", tmp_path / "run", *sets(TRAIN_SETS))
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt.class_names == ("apple", "pear", "plum") and ckpt.decoder_args["num_classes"] == 4
    weclip("evaluate", tmp_path / "fruit.parquet", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "-o",
           tmp_path / "eval", "--no-crf")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["iou"]) == ["background", "apple", "pear", "plum"]

    # presence check: the text embeddings the CAMs use are the custom prompts', independently encoded
    backbone = build_tiny_backbone(seed=0)  # the random init every extract worker builds (model.init_seed 0)
    template = ckpt.config.text.template
    text = text_embeddings(backbone, ckpt.classes, template)
    expected = backbone.encode_text([template.format(p) for p in ("apple", "a ripe pear", "plum")])
    torch.testing.assert_close(text.fg, expected.float())
    assert text.bg.shape[0] == len(VOC_BACKGROUND)
    bare = backbone.encode_text([template.format("pear")])[0]
    assert not torch.allclose(text.fg[1], bare)  # the class file's prompt, not the bare name, is what CAMs see
