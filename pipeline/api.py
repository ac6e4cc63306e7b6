"""The notebook API, re-exported by `import weclip`: a trained model that segments images, and a feature cache to look
into. Both are thin handles over the library parts the commands use, so a notebook gets exactly what `weclip infer`
and `weclip inspect` see.

    import weclip
    model = weclip.load("runs/voc/best.pt")          # a checkpoint or a weights-only export
    labels = model.predict("dog.jpg")                 # H×W uint8 class ids (0 = background)
    model.class_names[labels.max()]
    cache = weclip.open_cache("caches/voc")
    sample = cache.sample(0)                          # arrays of the first committed sample + its index row
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from weclip.pipeline.cache.store import CacheReader
from weclip.pipeline.config import EvalConfig
from weclip.pipeline.data.images import load_rgb
from weclip.pipeline.errors import InferError
from weclip.pipeline.inference.predict import Predictor, load_predictor
from weclip.pipeline.inference.segment import check_msc_size
from weclip.pipeline.model.backbone import default_device

ImageLike = str | Path | np.ndarray


@dataclass
class Model:
    """A checkpoint with its frozen backbone. `eval` holds the inference settings (default: the checkpoint's own);
    change them with `model.with_eval(scales=(1.0,), flip=False)`."""
    predictor: Predictor
    eval: EvalConfig

    @property
    def class_names(self) -> tuple[str, ...]:
        """Name of each label id: background, then the checkpoint's classes."""
        return self.predictor.class_names

    def with_eval(self, **changes: Any) -> "Model":
        """The same model with other inference settings (fields of `EvalConfig`, checked like `--set eval.*`)."""
        return dataclasses.replace(self, eval=dataclasses.replace(self.eval, **changes))

    def predict(self, image: ImageLike) -> np.ndarray:
        """H×W uint8 label ids of an image file or an H×W×3 uint8 RGB array: multi-scale + flip argmax, without
        DenseCRF (`weclip infer --crf` applies it to whole folders)."""
        return self.predictor.predict("image", self._rgb(image), self.eval, crf=False)

    def logits(self, image: ImageLike) -> np.ndarray:
        """C×H×W float32 multi-scale + flip logits (class 0 = background)."""
        return self.predictor.logits(self._rgb(image), self.eval).float().cpu().numpy()

    def _rgb(self, image: ImageLike) -> np.ndarray:
        """The image as RGB, refused (ImageTooSmall) when a scale of `eval` would leave it less than one patch."""
        rgb = _rgb(image)
        check_msc_size(*rgb.shape[:2], self.eval, self.predictor.backbone.patch_size)
        return rgb


def load(checkpoint: str | Path, device: str | None = None, pretrained: str | None = None,
         model_configs: Sequence[str | Path] = ()) -> Model:
    """A `weclip train` checkpoint (or `weclip export` weights) with the backbone it was trained on; `pretrained`
    gives that backbone's weights when they moved since training; `device` defaults to CUDA when present."""
    predictor = load_predictor(checkpoint, default_device(device), model_configs, pretrained)
    return Model(predictor, predictor.checkpoint.config.eval)


class Cache:
    """A feature cache's committed samples, read-only: `len(cache)`, `cache.index` (one row per sample),
    `cache.sample(i)` (the i-th committed sample's arrays and its index row), `cache.spec` and `cache.fingerprint`."""

    def __init__(self, root: str | Path):
        self.reader = CacheReader(str(root))
        self._order = np.argsort(self.reader.index.column("row").to_numpy(), kind="stable")

    def __len__(self) -> int:
        return len(self._order)

    @property
    def index(self):
        return self.reader.index

    @property
    def spec(self):
        return self.reader.spec

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.reader.fingerprint

    def sample(self, i: int) -> dict[str, Any]:
        """The arrays of the i-th committed sample (in row order; negative i counts from the end) and its index row."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of a cache with {len(self)} committed samples")
        meta = self.reader.index.slice(int(self._order[i]), 1).to_pylist()[0]
        return {**self.reader.read_sample(int(meta["row"])), "meta": meta}


def open_cache(root: str | Path) -> Cache:
    """The feature cache at a folder or fsspec URL (checked like `weclip train` checks it)."""
    return Cache(root)


def _rgb(image: ImageLike) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InferError(f"an image array must be H×W×3 uint8 RGB, got shape {image.shape} dtype {image.dtype}; "
                             "convert it (e.g. np.asarray(pil_image.convert('RGB')))")
        return image
    return load_rgb(image)
