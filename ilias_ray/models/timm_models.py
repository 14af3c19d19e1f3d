"""timm backbones, created the way the ILIAS reference creates them (spec section 5)."""

from __future__ import annotations

import functools
import re
from typing import Optional

import timm
import torch

from ilias_ray.models.base import (
    ALL_POOLINGS,
    CNN_POOLINGS,
    Backbone,
    ModelSpec,
    Weights,
    hf_cached,
    hf_hint,
    load_into,
    load_state_dict,
    strip_prefixes,
    unknown_model,
    url_cached,
    url_hint,
)

# Benchmark rows named `{method}_{dim}-{timm architecture}`: a timm backbone fine-tuned with a
# `dim`-d embedding layer as its classifier (Recall@k surrogate, UDON, USCRR). No hub serves them.
CUSTOM = re.compile(r"^(recall|udon|uscrr)_(\d+)-(.+)$")


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


def custom(name: str):
    """(method, embedding dim, timm architecture) for `recall_512-resnet50`-style names, else None."""
    m = CUSTOM.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def custom_hint(name: str) -> str:
    method, dim, arch = custom(name)
    return (
        f"a state_dict of timm's {arch} created with num_classes={dim} (the {method} embedding layer "
        f"as its classifier), .pth or .safetensors"
    )


def spec(name: str) -> ModelSpec:
    c = custom(name)
    if c and timm.is_model(c[2]):
        vit = is_vit(name)
        return ModelSpec(
            patch=patch_size(name) if vit else 0,
            poolings=ALL_POOLINGS if vit else CNN_POOLINGS,
            weights=Weights("user checkpoint", None, custom_hint(name), public=False),
        )
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


def create_custom(name: str, checkpoint=None) -> torch.nn.Module:
    _method, dim, arch = custom(name)
    torch.manual_seed(0)
    kwargs = {"dynamic_img_size": True} if is_vit(name) else {}
    model = timm.create_model(arch, pretrained=False, num_classes=dim, **kwargs)
    if checkpoint:
        sd = strip_prefixes(load_state_dict(checkpoint), ("module.", "model."))
        load_into(model, sd, checkpoint)
    return model


def head_dim(model: torch.nn.Module) -> int:
    """Width of a timm model's output: its classifier's classes (kept CLIP projections, embedding
    layers), else the pre-logits features (`head_hidden_size` where the head has a hidden layer)."""
    return model.num_classes or getattr(model, "head_hidden_size", None) or model.num_features


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    s = spec(name)
    if custom(name):
        model = create_custom(name, checkpoint).eval()
    else:
        model = create(name, checkpoint, pretrained).eval()
    pc = model.pretrained_cfg or {}
    return Backbone(
        model=model,
        dim=head_dim(model),
        mean=tuple(pc.get("mean", s.mean)),
        std=tuple(pc.get("std", s.std)),
        patch=s.patch,
        token_pool=getattr(model, "global_pool", None) == "token",
    )
