"""What the spec-math test files share (test_preprocess, test_embed, test_model_timm): seeded
inputs, the settings of a test run, one model stage per distinct setting, and the reference
constants written out from the spec (never imported from the code under test).

Every expected value in those files is computed in the test itself: hand-written formulas and
loops, or torchvision / PIL / the timm model object used directly, the way the reference uses
them. The code under test is never used to compute its own expected value. CPU only, no Ray, no
network: timm models are built with pretrained=False.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import stage_settings as stages
from ilias_ray.config import Config

VIT = "vit_tiny_patch16_224"
CNN = "resnet18"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def rng_pixels(seed, *shape):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def make_cfg(**over):
    cfg = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))
    cfg.update(pretrained=False, comp_fp16=False, store_fp16=False, batch_size=8)
    cfg.update(over)
    return cfg


_EMBEDDERS = {}


def embedder(**over):
    """One Embedder per distinct config (model creation is the slow part)."""
    key = tuple(sorted(over.items()))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = stages.embedder(make_cfg(**over))
    return _EMBEDDERS[key]
