"""Validation mIoU during training (`train.val_every`): the decoder being trained, with the frozen backbone, scored on
a val manifest exactly as `weclip evaluate` scores a checkpoint without CRF (msc + flip of the `eval` section,
docs/algorithm.md §8.1; `pipeline.inference.predict`, `pipeline.metrics.ConfusionMatrix`).

Validation must not change the run: it draws from no generator the training uses (the RNG states are forked and
restored around it), and the decoder goes back to train mode, so a run with validation has the losses of one
without, and a resumed run stays exact. On several training processes each scores every size-th image and the
confusion matrices are summed, so every rank gets the mIoU of the whole manifest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from weclip.pipeline.config import Config
from weclip.pipeline.data.manifest import read_manifest
from weclip.pipeline.errors import TrainError
from weclip.pipeline.inference.predict import Predictor, read_gt, read_rgb
from weclip.pipeline.inference.segment import segment_fn
from weclip.pipeline.metrics import ConfusionMatrix
from weclip.pipeline.model.backbone import load_backbone
from weclip.pipeline.model.decoder import WeCLIPDecoder
from weclip.pipeline.model.protocol import CLIPBackbone
from weclip.pipeline.model.text import ClassSet, require_classes
from weclip.pipeline.training.checkpoint import Checkpoint, decoder_args
from weclip.pipeline.training.distributed import World


class Validator:
    """Scores the decoder being trained (the same object, updated in place by the optimizer) on every image of a val
    manifest, which must have masks and the run's classes."""

    def __init__(self, manifest_path: str | Path, cfg: Config, fingerprint: dict, classes: ClassSet,
                 decoder: WeCLIPDecoder, backbone: CLIPBackbone | None, device: torch.device,
                 model_configs: Sequence[str | Path] = (), world: World = World()):
        self.data = read_manifest(manifest_path)
        require_classes(self.data.class_names, f"val manifest {self.data.path} of dataset {self.data.dataset!r}",
                        classes.classes, "the run's training data",
                        "validate on a manifest of the training dataset's classes", TrainError)
        unlabelled = [r.image_id for r in self.data.rows if r.mask_path is None]
        if unlabelled:
            raise TrainError(f"val manifest {self.data.path} has {len(unlabelled)} images without a mask (e.g. "
                             f"{unlabelled[:3]}); validation needs ground truth, give a manifest with masks")
        if backbone is None:
            backbone = load_backbone(cfg.model, device, model_configs)
        if backbone.identity != fingerprint.get("checkpoint"):
            raise TrainError(f"model config ({cfg.model.name}, pretrained={cfg.model.pretrained!r}) loads backbone "
                             f"{backbone.identity!r}, but the training data was extracted with "
                             f"{fingerprint.get('checkpoint')!r}; validate with the backbone the cache was made with")
        # the record a checkpoint of the run would hold, without its states: what a Predictor reads of a checkpoint
        record = Checkpoint(path=Path("<decoder in training>"), step=0, decoder_state={},
                            decoder_args=decoder_args(decoder), optimizer_state={}, scheduler_state={}, config=cfg,
                            fingerprint=fingerprint, classes=classes, rng_state={})
        self.predictor = Predictor(record, backbone, decoder, segment_fn(backbone, decoder, cfg.extract.feature_layers))
        self.cfg, self.world = cfg, world

    def miou(self) -> float | None:
        """mIoU of the decoder now on the val manifest (CRF off; None when no pixel has ground truth); the decoder
        is left in train mode and the RNG states as they were."""
        decoder, backbone = self.predictor.decoder, self.predictor.backbone
        cm = ConfusionMatrix(len(self.predictor.class_names))
        with torch.random.fork_rng(devices=[backbone.device] if backbone.device.type == "cuda" else []):
            decoder.eval()
            try:
                for row in self.data.rows[self.world.rank::self.world.size]:
                    labels = self.predictor.predict(row.image_id, read_rgb(self.data, row), self.cfg.eval, crf=False)
                    cm.update(labels, read_gt(self.data, row))
            finally:
                decoder.train()
        cm.matrix = self.world.sum(torch.from_numpy(cm.matrix)).numpy()
        return cm.miou() if cm.pixel_count else None
