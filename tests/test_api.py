"""pipeline/api.py (`import weclip`): a model that predicts what `weclip infer` writes, and a cache whose samples are
what the reader returns for their rows."""
from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.stages import eval_fakes as ef
from tests.stages import extract_fakes as xf

from weclip.pipeline import api
from weclip.pipeline.data.images import load_rgb
from weclip.pipeline.errors import InferError
from weclip.stages import extract, infer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cfg = ef.tiny_config()
    manifest = ef.make_world(root)
    return {"root": root, "checkpoint": ef.make_checkpoint(root / "checkpoint.pt", cfg, manifest),
            "image": root / "voc" / "JPEGImages" / "a.jpg"}


def test_predict_equals_what_infer_writes(world, tmp_path):
    model = api.load(world["checkpoint"], device="cpu")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(world["image"].read_bytes())
    infer.run(world["checkpoint"], folder, tmp_path / "out", crf=False, device="cpu", progress=False)
    written = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    labels = model.predict(world["image"])
    assert labels.dtype == np.uint8 and labels.shape == written.shape
    np.testing.assert_array_equal(labels, written)
    np.testing.assert_array_equal(model.predict(load_rgb(world["image"])), labels)  # an RGB array, same labels
    assert model.class_names[0] == "background" and len(model.class_names) == model.logits(world["image"]).shape[0]


def test_eval_settings_are_changed_checked(world):
    model = api.load(world["checkpoint"], device="cpu")
    single = model.with_eval(scales=(1.0,), flip=False)
    assert single.eval.scales == (1.0,) and model.eval.scales != (1.0,)
    with pytest.raises(Exception, match="flip"):
        model.with_eval(flip="sometimes")


def test_a_bad_image_array_is_refused(world):
    model = api.load(world["checkpoint"], device="cpu")
    with pytest.raises(InferError, match="H×W×3 uint8"):
        model.predict(np.zeros((8, 8), dtype=np.float32))


def test_cache_samples_are_the_stored_rows(tmp_path):
    manifest = xf.make_dataset(tmp_path / "data")
    extract.run(xf.tiny_config(), manifest, tmp_path / "cache", executor="inline", progress=False,
                model_configs=[xf.TINY_CONFIG])
    cache = api.open_cache(tmp_path / "cache")
    assert len(cache) == cache.index.num_rows == 10
    group = zarr.open_group(str(tmp_path / "cache"), mode="r")  # the arrays as zarr itself reads them
    last = cache.sample(-1)
    assert last["meta"]["row"] == max(cache.index.column("row").to_pylist())
    row = last["meta"]["row"]
    for name in ("cam_classes", "image", "valid"):  # stored as they are
        np.testing.assert_array_equal(last[name], np.asarray(group[name][row]))
    features = cache.spec.arrays()["features"]  # 8-bit with per-token scales: the sample holds their decoding
    assert features.storage != "plain" and last["features"].shape == features.shape
    np.testing.assert_array_equal(last["features"], features.from_storage(np.asarray(group["features"][row:row + 1]))[0])
    with pytest.raises(IndexError):
        cache.sample(len(cache))
