"""timm backbones, created the way the ILIAS reference creates them (spec section 5)."""

from __future__ import annotations

import functools

import timm
import torch

from ilias_ray.config import UserError
from ilias_ray.models import (ALL_POOLINGS, CNN_POOLINGS, Backbone, ModelSpec, Weights, hf_cached, hf_hint,
                              unknown_model, url_cached, url_hint)


def keeps_head(name: str) -> bool:
    # CLIP-style models keep their projection head; all others drop the classifier.
    return "clip" in name or "pe_core" in name


def is_vit(name: str) -> bool:
    return any(s in name for s in ("vit", "eva", "deit"))


def patch_size(name: str) -> int:
    return 16 if "patch16" in name else 14


@functools.lru_cache(maxsize=1)
def names() -> tuple:
    return tuple(sorted(set(timm.list_models()) | set(timm.list_pretrained())))


def weights(name: str) -> Weights:
    pc = timm.models.get_pretrained_cfg(name)
    if pc is None:
        return Weights("none", None, "timm publishes no weights for this name; pass --checkpoint FILE")
    if pc.hf_hub_id:
        repo = pc.hf_hub_id
        return Weights(f"hf-hub:{repo}", hf_cached(repo), hf_hint(repo))
    if pc.url:
        return Weights(pc.url, url_cached(pc.url), url_hint(pc.url))
    return Weights("none", None, "pass --checkpoint FILE")


def spec(name: str) -> ModelSpec:
    if not timm.is_model(name):
        raise unknown_model("timm", name, names())
    pc = timm.models.get_pretrained_cfg(name)
    vit = is_vit(name)
    return ModelSpec(
        mean=tuple(getattr(pc, "mean", None) or (0.485, 0.456, 0.406)),
        std=tuple(getattr(pc, "std", None) or (0.229, 0.224, 0.225)),
        patch=patch_size(name) if vit else 0,
        poolings=ALL_POOLINGS if vit else CNN_POOLINGS,
        has_text=False,
        weights=weights(name),
    )


def create(name: str, checkpoint=None, pretrained=True, **extra) -> torch.nn.Module:
    kwargs = dict(extra)
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
            raise unknown_model("timm", name, names()) from None
        raise


def build(cfg: dict) -> Backbone:
    name = cfg["model"]
    s = spec(name)
    model = create(name, cfg.get("checkpoint"), cfg.get("pretrained", True)).eval()
    pc = model.pretrained_cfg or {}
    return Backbone(
        model=model,
        mean=tuple(pc.get("mean", s.mean)),
        std=tuple(pc.get("std", s.std)),
        patch=s.patch,
        token_pool=getattr(model, "global_pool", None) == "token",
    )
