"""stages/infer.py: a folder of images (nested, one corrupt, one not an image) → palette PNGs, overlays, failures."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.stages import eval_fakes as ef

from weclip.pipeline.data.images import load_rgb
from weclip.pipeline.palette import VOC_COLORMAP
from weclip.pipeline.inference import crf_pool
from weclip.stages import evaluate, infer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    cfg = ef.tiny_config()
    manifest = ef.make_world(root)
    checkpoint = ef.make_checkpoint(root / "checkpoint.pt", cfg, manifest)
    images = root / "images"
    (images / "nested").mkdir(parents=True)
    for name in ("a", "b"):
        shutil.copy(root / "voc" / "JPEGImages" / f"{name}.jpg", images / f"{name}.jpg")
    shutil.copy(root / "voc" / "JPEGImages" / "c.jpg", images / "nested" / "c.jpg")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (images / "notes.txt").write_text("not an image, not listed")
    return {"root": root, "cfg": cfg, "manifest": manifest, "checkpoint": checkpoint, "images": images}


def test_a_corrupt_image_is_reported_and_the_rest_written(world):
    out = world["root"] / "out"
    summary = infer.run(world["checkpoint"], world["images"], out, crf=True, overlays=True, workers=2,
                        progress=False, model_configs=[ef.TINY_CONFIG])
    assert summary.found == 4 and summary.written == 3
    assert [f["image"] for f in summary.failed] == ["broken.jpg"] and summary.failed[0]["reason"] == "corrupt"
    assert [json.loads(line)["image"] for line in Path(summary.failures_file).read_text().splitlines()] == \
        ["broken.jpg"]
    assert "broken.jpg" in summary.format()
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png") if "overlays" not in p.parts) == \
        ["a.png", "b.png", "nested/c.png"]
    evaluated = evaluate.run(world["checkpoint"], world["manifest"], world["root"] / "eval", crf=True,
                             save_predictions=True, workers=0, progress=False, model_configs=[ef.TINY_CONFIG])
    for name in ("a", "b", "nested/c"):
        with Image.open(out / f"{name}.png") as im:
            assert im.mode == "P"
            np.testing.assert_array_equal(np.array(im.getpalette()[:768]).reshape(256, 3), VOC_COLORMAP)
            labels = np.array(im)
        np.testing.assert_array_equal(labels, np.array(Image.open(Path(evaluated.predictions) /
                                                                  f"{Path(name).name}.png")))
        blended = np.array(Image.open(out / "overlays" / f"{name}.png"))
        rgb = load_rgb(world["images"] / f"{name}.jpg")
        np.testing.assert_array_equal(blended[labels == 0], rgb[labels == 0])


def test_rerun_without_failures_empties_the_failures_file(world, tmp_path):
    folder = tmp_path / "clean"
    folder.mkdir()
    shutil.copy(world["images"] / "a.jpg", folder / "a.jpg")
    out = world["root"] / "out"  # the folder of the first test, whose failures file lists broken.jpg
    summary = infer.run(world["checkpoint"], folder, out, progress=False, model_configs=[ef.TINY_CONFIG])
    assert summary.written == 1 and summary.failed == [] and Path(summary.failures_file).read_text() == ""


def test_refuses_two_images_with_one_output_name(world, tmp_path):
    folder = tmp_path / "twins"
    folder.mkdir()
    shutil.copy(world["images"] / "a.jpg", folder / "x.jpg")
    Image.open(world["images"] / "a.jpg").save(folder / "x.png")
    with pytest.raises(infer.InferError, match="both be written as x.png"):
        infer.run(world["checkpoint"], folder, tmp_path / "o", progress=False, model_configs=[ef.TINY_CONFIG])
    with pytest.raises(infer.InferError, match="does not exist"):  # a single image file is accepted
        infer.run(world["checkpoint"], folder / "missing.jpg", tmp_path / "o", progress=False)


def test_outputs_inside_the_input_folder_are_not_inputs(world, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(world["images"] / "b.jpg", folder / "b.jpg")
    for _ in range(2):
        summary = infer.run(world["checkpoint"], folder, folder / "segmented", progress=False,
                            model_configs=[ef.TINY_CONFIG])
        assert summary.found == summary.written == 1


def test_an_image_too_small_for_one_patch_is_a_recorded_failure(world, tmp_path):
    """A 4×3000 strip is 1 pixel high at the inference size: listed with its reason, the good image still written."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(world["images"] / "a.jpg", images / "a.jpg")
    Image.fromarray(np.full((4, 3000, 3), 128, np.uint8)).save(images / "strip.png")
    summary = infer.run(world["checkpoint"], images, tmp_path / "out", crf=False, progress=False,
                        model_configs=[ef.TINY_CONFIG])
    assert (summary.found, summary.written) == (2, 1)
    assert [(f["image"], f["reason"]) for f in summary.failed] == [("strip.png", "too_small")]
    assert "4×3000" in summary.failed[0]["detail"]
    assert (tmp_path / "out" / "a.png").exists() and not (tmp_path / "out" / "strip.png").exists()
