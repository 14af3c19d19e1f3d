"""timm backbones, created the way the ILIAS reference creates them (spec section 5)."""

from __future__ import annotations

import timm
import torch

from ilias_ray.config import UserError
from ilias_ray.models import Backbone


def keeps_head(name: str) -> bool:
    # CLIP-style models keep their projection head; all others drop the classifier.
    return "clip" in name or "pe_core" in name


def is_vit(name: str) -> bool:
    return any(s in name for s in ("vit", "eva", "deit"))


def patch_size(name: str) -> int:
    return 16 if "patch16" in name else 14


def create(name: str, checkpoint=None, pretrained=True) -> torch.nn.Module:
    kwargs = {}
    if not keeps_head(name):
        kwargs["num_classes"] = 0
    if is_vit(name):
        kwargs["dynamic_img_size"] = True
    if checkpoint:
        # timm's own file loader: weights_only / safetensors, its checkpoint filters, and the
        # classifier dropped when num_classes=0, exactly as for a hub download.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": checkpoint})
    elif not pretrained:
        torch.manual_seed(0)  # every actor builds the same random weights
        kwargs["pretrained"] = False
    else:
        kwargs["pretrained"] = True
    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"timm has no model named {name!r}") from None
        raise


def build(cfg: dict) -> Backbone:
    name = cfg["model"]
    model = create(name, cfg.get("checkpoint"), cfg.get("pretrained", True)).eval()
    pc = model.pretrained_cfg or {}
    vit = is_vit(name)
    if cfg["pooling"] == "cls" and not vit:
        raise UserError(f"--pooling cls needs a ViT; {name} has no class token")
    return Backbone(
        model=model,
        mean=tuple(pc.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pc.get("std", (0.229, 0.224, 0.225))),
        patch=patch_size(name) if vit else 0,
        token_pool=getattr(model, "global_pool", None) == "token",
    )
