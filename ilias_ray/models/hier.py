"""`--framework hier`: HIER (Kim et al., CVPR 2023) metric-learning ViTs fine-tuned from DINO.

No hub serves them. The user's checkpoint is a timm ViT/16 state_dict; its width picks the
architecture (384: ViT-S/16, 768: ViT-B/16) and its `head.weight`, if any, the embedding size.
"""

from __future__ import annotations

from typing import Optional

import timm
import torch

from ilias_ray.models.base import (
    ALL_POOLINGS,
    Backbone,
    ModelSpec,
    Weights,
    load_into,
    load_state_dict,
    strip_prefixes,
    unknown_model,
)

NAMES = ("dino_vit16_patch16_224_sop",)
WIDTHS = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}
HINT = (
    "the HIER checkpoint as a timm vit_small_patch16_224 / vit_base_patch16_224 state_dict "
    "(optionally with head.weight/head.bias: the embedding layer)"
)


def names() -> tuple:
    return NAMES


def spec(name: str) -> ModelSpec:
    if name not in NAMES:
        raise unknown_model("hier", name, NAMES)
    return ModelSpec(patch=16, poolings=ALL_POOLINGS, weights=Weights("user checkpoint", None, HINT, public=False))


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    spec(name)
    sd = strip_prefixes(load_state_dict(checkpoint), ("module.", "model.", "backbone.")) if checkpoint else {}
    width = sd["cls_token"].shape[-1] if "cls_token" in sd else 384
    if width not in WIDTHS:
        from ilias_ray.errors import UserError

        raise UserError(f"--checkpoint {checkpoint}: a ViT of width {width}; hier expects 384 or 768")
    classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    torch.manual_seed(0)
    model = timm.create_model(WIDTHS[width], pretrained=False, num_classes=classes, dynamic_img_size=True)
    if checkpoint:
        load_into(model, sd, checkpoint)
    return Backbone(model=model.eval(), dim=classes or width, patch=16, token_pool=True)
