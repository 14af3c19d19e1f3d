"""Text towers: the image model's timm name -> open_clip model and pretrained tag (spec 8)."""

from __future__ import annotations

from typing import Optional

import torch

from ilias_ray.models.base import Backbone, ModelSpec, unknown_model
from ilias_ray.models.och import open_clip_pretrained, open_clip_weights

_HF = "hf-hub:timm/"
TEXT_MODELS = {
    "vit_large_patch16_siglip_384.webli": (_HF + "ViT-L-16-SigLIP-384", None),
    "vit_so400m_patch14_siglip_384.webli": (_HF + "ViT-SO400M-14-SigLIP-384", None),
    "convnext_large_mlp.clip_laion2b_ft_soup_320": ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup"),
    "vit_large_patch14_clip_336.openai": ("ViT-L-14-336", "openai"),
    "eva02_large_patch14_clip_336.merged2b": ("EVA02-L-14", "merged2b_s4b_b131k"),
    "vit_large_patch14_clip_224.metaclip_2pt5b": ("ViT-L-14-quickgelu", "metaclip_fullcc"),
    "RN50.openai": ("RN50", "openai"),
    "vit_base_patch16_clip_224.openai": ("ViT-B-16", "openai"),
    "vit_large_patch14_clip_224.openai": ("ViT-L-14", "openai"),
    "vit_large_patch14_clip_224.laion2b": ("ViT-L-14", "laion2b_s32b_b82k"),
    "convnext_base.clip_laion2b_augreg": ("convnext_base_w", "laion2b_s13b_b82k_augreg"),
    "eva02_base_patch16_clip_224.merged2b": ("EVA02-B-16", "merged2b_s8b_b131k"),
    "vit_base_patch16_siglip_224.webli": (_HF + "ViT-B-16-SigLIP", None),
    "vit_base_patch16_siglip_512.webli": (_HF + "ViT-B-16-SigLIP-512", None),
    "vit_base_patch16_clip_224.metaclip_2pt5b": ("ViT-B-16-quickgelu", "metaclip_fullcc"),
    "vit_base_patch16_siglip_256.webli": (_HF + "ViT-B-16-SigLIP-256", None),
    "vit_base_patch16_siglip_384.webli": (_HF + "ViT-B-16-SigLIP-384", None),
    "vit_large_patch16_siglip_256.webli": (_HF + "ViT-L-16-SigLIP-256", None),
    "vit_base_patch16_siglip_384.v2_webli": (_HF + "ViT-B-16-SigLIP2-384", None),
    "vit_base_patch16_siglip_512.v2_webli": (_HF + "ViT-B-16-SigLIP2-512", None),
    "vit_large_patch16_siglip_384.v2_webli": (_HF + "ViT-L-16-SigLIP2-384", None),
    "vit_large_patch16_siglip_512.v2_webli": (_HF + "ViT-L-16-SigLIP2-512", None),
    "vit_giantopt_patch16_siglip_384.v2_webli": (_HF + "ViT-gopt-16-SigLIP2-384", None),
    "vit_so400m_patch16_siglip_512.v2_webli": (_HF + "ViT-SO400M-16-SigLIP2-512", None),
    "vit_pe_core_base_patch16_224.fb": (_HF + "PE-Core-B-16", None),
    "vit_pe_core_large_patch14_336.fb": (_HF + "PE-Core-L-14-336", None),
}


def names() -> tuple:
    return tuple(sorted(TEXT_MODELS))


def lookup(model: str) -> tuple:
    """(open_clip model, pretrained tag) for the image model's timm name."""
    if model not in TEXT_MODELS:
        raise unknown_model("text", model, TEXT_MODELS)
    return TEXT_MODELS[model]


def spec(name: str) -> ModelSpec:
    oc_name, tag = lookup(name)
    return ModelSpec(has_text=True, poolings=("head",), weights=open_clip_weights(oc_name, tag))


def text_dim(model: torch.nn.Module) -> int:
    """Width of `encode_text`: the text projection's output, else the text transformer's width.
    CLIP keeps the text tower's parts on the model itself; CustomTextCLIP keeps it whole as `text`."""
    tower = getattr(model, "text", None) or model
    proj = getattr(tower, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    return proj.shape[-1] if proj is not None else tower.transformer.width


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    import open_clip

    oc_name, tag = lookup(name)
    model = open_clip.create_model(oc_name, pretrained=open_clip_pretrained(tag, checkpoint, pretrained))
    model.visual = None  # only the text tower is used
    return Backbone(model=model.eval(), dim=text_dim(model), tokenizer=open_clip.get_tokenizer(oc_name))
