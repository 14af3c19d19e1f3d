"""Backbone registry: `--framework` name -> builder. One module per framework.

A builder returns a `Backbone`: the torch module plus what the model stage needs to feed it
exactly as the reference does (mean/std, padding multiple, how to pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Backbone:
    model: torch.nn.Module
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    patch: int = 0  # ViT inputs are zero-padded to a multiple of this (0 = no padding)
    token_pool: bool = False  # the model's global_pool is "token" (a class token at x[:, 0])
    tokenizer: Optional[Callable] = None  # text towers only


def _timm(cfg: dict) -> Backbone:
    from ilias_ray.models.timm_models import build

    return build(cfg)


def _text(cfg: dict) -> Backbone:
    from ilias_ray.models.text import build

    return build(cfg)


FRAMEWORKS = {"timm": _timm, "text": _text}


def build(cfg: dict) -> Backbone:
    """Build the backbone for `cfg` (a Config as dict), in eval mode, on the CPU."""
    return FRAMEWORKS[cfg["framework"]](cfg)


def check(cfg: dict) -> None:
    """Cheap name checks on the driver, so a typo fails before any Ray work."""
    from ilias_ray.config import UserError

    if cfg["framework"] == "text":
        from ilias_ray.models.text import lookup

        lookup(cfg["model"])
        return
    import timm

    from ilias_ray.models.timm_models import is_vit

    if not timm.is_model(cfg["model"]):
        raise UserError(f"timm has no model named {cfg['model']!r}")
    if cfg["pooling"] == "cls" and not is_vit(cfg["model"]):
        raise UserError(f"--pooling cls needs a ViT; {cfg['model']} has no class token")
