"""Meta's self-supervised backbones (`--framework fb`): DINO, DINOv2 (+reg), DINOv3, SwAV, MoCo v3.

No remote code by default. Where timm carries the same weights (DINO ViTs, DINOv2, DINOv2-reg,
DINOv3) we build through timm: its checkpoint filter maps the original key names, so the
original `.pth` files also load with `--checkpoint`. The ResNet-50s and MoCo v3 ViT-B are plain
architectures (timm's `resnet50`, `vit_base_patch16_224`) loaded from the released weight files
(read with `weights_only=True`). torch.hub code runs only with `--trust_remote_code true`.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
import torch.nn.functional as F

from ilias_ray.models import timm_models
from ilias_ray.models.base import (
    ALL_POOLINGS,
    CNN_POOLINGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    ModelSpec,
    Weights,
    load_into,
    load_state_dict,
    strip_prefixes,
    unknown_model,
    url_cached,
    url_hint,
)

_V2 = {"s": "small", "b": "base", "l": "large", "g": "giant"}
_V3 = {"s": "small", "b": "base", "l": "large", "hplus": "huge_plus", "7b": "7b"}

# fb name -> timm name with the same weights
TIMM = {
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vits8": "vit_small_patch8_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    **{f"dinov2_vit{k}14": f"vit_{v}_patch14_dinov2.lvd142m" for k, v in _V2.items()},
    **{f"dinov2_vit{k}14_reg": f"vit_{v}_patch14_reg4_dinov2.lvd142m" for k, v in _V2.items()},
    **{f"dinov3_vit{k}16": f"vit_{v}_patch16_dinov3.lvd1689m" for k, v in _V3.items()},
}

_FB = "https://dl.fbaipublicfiles.com"
# fb name -> (timm architecture, released weight file, key prefixes to strip, hub repo and entry)
RELEASED = {
    "dino_resnet50": (
        "resnet50",
        f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        (),
        ("facebookresearch/dino:main", "dino_resnet50"),
    ),
    "swav": (
        "resnet50",
        f"{_FB}/deepcluster/swav_800ep_pretrain.pth.tar",
        ("module.",),
        ("facebookresearch/swav:main", "resnet50"),
    ),
    "mocov3_resnet50": ("resnet50", f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar", ("module.base_encoder.",), None),
    "mocov3_vitb16": (
        "vit_base_patch16_224",
        f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar",
        ("module.base_encoder.",),
        None,
    ),
}
HUB_DIM = 2048  # the torch.hub entries are ResNet-50s whose `fc` we drop: their pooled features
# Heads of the self-supervised training (projectors, prototypes, the momentum twin) are not features.
DROP = (
    "fc.",
    "head.",
    "projection_head.",
    "prototypes.",
    "module.momentum_encoder.",
    "module.predictor.",
    "momentum_encoder.",
    "predictor.",
)


def names() -> tuple:
    return tuple(sorted(set(TIMM) | set(RELEASED)))


def patch_of(name: str) -> int:
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 0


def spec(name: str) -> ModelSpec:
    if name in TIMM:
        s = timm_models.spec(TIMM[name])
        # The reference pads every DINO (v1) ViT to a multiple of 16, patch8 ones included.
        patch = 16 if name.startswith("dino_") else patch_of(TIMM[name])
        return ModelSpec(mean=IMAGENET_MEAN, std=IMAGENET_STD, patch=patch, poolings=ALL_POOLINGS, weights=s.weights)
    if name in RELEASED:
        arch, url, _, _ = RELEASED[name]
        vit = timm_models.is_vit(arch)
        return ModelSpec(
            patch=patch_of(arch) if vit else 0,
            poolings=ALL_POOLINGS if vit else CNN_POOLINGS,
            weights=Weights(url, url_cached(url), url_hint(url)),
        )
    raise unknown_model("fb", name, names())


def _use_hub(name: str, checkpoint: Optional[str], pretrained: bool, trust_remote_code: bool) -> bool:
    """torch.hub runs the repo's code: only on the user's explicit --trust_remote_code true."""
    return (
        bool(trust_remote_code) and name in RELEASED and RELEASED[name][3] is not None and not checkpoint and pretrained
    )


def use_dino_pos_embed(model) -> None:
    """Resize position embeddings as DINO's and DINOv2's own `interpolate_pos_encoding` do.

    timm's dynamic size resamples with `size=` and antialias; DINO (v1 and v2) uses a scale factor
    of (grid + 0.1) / M without antialias, and keeps the table as is at its own square grid. The
    reference runs the original models, so this is what gives their features.
    """
    offset, antialias = 0.1, False

    def pos_embed(x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape  # patch tokens, NHWC (dynamic_img_size)
        table = model.pos_embed
        lead = 0 if model.no_embed_class else 1  # the class-token slot, when not folded into cls_token
        patch_pe = table[:, lead:]
        m = math.isqrt(patch_pe.shape[1])
        if (h, w) != (m, m):
            g = patch_pe.float().reshape(1, m, m, c).permute(0, 3, 1, 2)
            g = F.interpolate(g, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic", antialias=antialias)
            if g.shape[-2:] != (h, w):
                raise RuntimeError(f"position embedding resized to {tuple(g.shape[-2:])}, not {(h, w)}")
            patch_pe = g.permute(0, 2, 3, 1).reshape(1, h * w, c).to(x.dtype)
        x = x.reshape(b, h * w, c)
        prefix = [model.cls_token.expand(b, -1, -1)]
        if model.reg_token is not None:
            prefix.append(model.reg_token.expand(b, -1, -1))
        if lead:
            x = torch.cat([prefix[0], x], dim=1) + torch.cat([table[:, :1], patch_pe], dim=1).to(x.dtype)
            x = torch.cat([x[:, :1], *prefix[1:], x[:, 1:]], dim=1)
        else:
            x = torch.cat([*prefix, x + patch_pe], dim=1)
        return model.pos_drop(x)

    model._pos_embed = pos_embed


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    s = spec(name)
    if name in TIMM:
        model = timm_models.create(TIMM[name], checkpoint, pretrained).eval()
        if name.startswith(("dino_", "dinov2_")):  # DINOv3 uses RoPE: no table to resize
            use_dino_pos_embed(model)
    elif _use_hub(name, checkpoint, pretrained, trust_remote_code):
        repo, entry = RELEASED[name][3]
        model = torch.hub.load(repo, entry, trust_repo=trust_remote_code).eval()
        if hasattr(model, "fc"):
            model.fc = torch.nn.Identity()  # the pooled features, as from the released weights
        return Backbone(model=model, dim=HUB_DIM, patch=s.patch)
    else:
        arch, url, prefixes, _ = RELEASED[name]
        model = timm_models.create(arch, None, pretrained=False).eval()
        if checkpoint:
            sd, src = load_state_dict(checkpoint), checkpoint
        elif pretrained:
            sd = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
            sd, src = sd.get("state_dict", sd), url
        else:
            sd = None
        if sd is not None:
            load_into(model, strip_prefixes(sd, prefixes), src, drop=DROP)
    token_pool = getattr(model, "global_pool", None) == "token"
    features = model.forward_features
    if name.startswith(("dinov2", "dinov3")):
        # As DINOv2's get_intermediate_layers(reshape=True): the normed class token, and the patch
        # tokens (register tokens excluded) on their 2-D grid, so R-MAC regions are 2-D.
        def features(x, f=model.forward_features, p=model.patch_embed.patch_size[0], prefix=model.num_prefix_tokens):
            t = f(x)
            grid = t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[-1], x.shape[-2] // p, x.shape[-1] // p)
            return t[:, 0], grid

    return Backbone(
        model=model,
        dim=timm_models.head_dim(model),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch=s.patch,
        token_pool=token_pool,
        features=features,
    )
