"""Shared fixtures: a tiny random open_clip ViT (tests/tiny-vit.json: patch 16, 3 blocks, width 64, embed 32)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

# Every Ray a test starts binds to 127.0.0.1 only (by default Ray on Linux binds the primary interface).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from weclip.pipeline.model.backbone import FrozenCLIP, register_model_configs

TINY_CONFIG = Path(__file__).parent / "tiny-vit.json"
TINY_NAME = TINY_CONFIG.stem  # open_clip registers a config file under its stem
register_model_configs(TINY_CONFIG)  # every in-process test can name the model; Ray workers get it passed


def build_tiny_backbone(seed: int = 0, **kwargs) -> FrozenCLIP:
    """A FrozenCLIP of the tiny config with seeded random weights (kwargs go to FrozenCLIP.load)."""
    torch.manual_seed(seed)
    return FrozenCLIP.load(TINY_NAME, **kwargs)


@pytest.fixture(scope="session")
def tiny_backbone() -> FrozenCLIP:
    """Shared across the session: do not mutate it; use `make_tiny_backbone` for a private one."""
    return build_tiny_backbone()


@pytest.fixture
def make_tiny_backbone() -> Callable[..., FrozenCLIP]:
    return build_tiny_backbone
