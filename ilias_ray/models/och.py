"""open_clip image towers (`--framework och`, e.g. `RN50.openai`).

The CLIP ResNets end in an attention pool whose position embedding is fixed to a 7x7 grid at
224 px; we interpolate it bicubically to the actual feature map, so any input size works.
"""

from __future__ import annotations

import functools
import types
from typing import Optional

import torch
import torch.nn.functional as F

from ilias_ray.models.base import (
    CNN_POOLINGS,
    OPENAI_MEAN,
    OPENAI_STD,
    Backbone,
    ModelSpec,
    Weights,
    hf_cached,
    hf_hint,
    unknown_model,
    url_cached,
    url_hint,
)


@functools.lru_cache(maxsize=1)
def names() -> tuple:
    import open_clip

    return tuple(sorted(f"{m}.{t}" for m, t in open_clip.list_pretrained() if m.startswith("RN")))


def split(model: str) -> tuple:
    name, _, tag = model.partition(".")
    return name, tag or None


def open_clip_weights(name: str, tag) -> Weights:
    """Where open_clip fetches `name`/`tag` from (hf-hub names carry their own repo)."""
    import open_clip

    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :]
        return Weights(name, hf_cached(repo), hf_hint(repo))
    pc = open_clip.get_pretrained_cfg(name, tag) or {}
    if pc.get("hf_hub"):
        repo = pc["hf_hub"].rstrip("/")
        return Weights(f"hf-hub:{repo}", hf_cached(repo), hf_hint(repo))
    if pc.get("url"):
        return Weights(pc["url"], url_cached(pc["url"]), url_hint(pc["url"]))
    return Weights("none", None, "pass --checkpoint FILE")


def open_clip_pretrained(tag, checkpoint: Optional[str], pretrained: bool):
    """open_clip's `pretrained=` for this run: the user's file, None (seeded random), or the tag."""
    if checkpoint:
        return checkpoint  # open_clip reads local files with weights_only=True
    if not pretrained:
        torch.manual_seed(0)  # every actor builds the same random weights
        return None
    return tag


def spec(name: str) -> ModelSpec:
    if name not in names():
        raise unknown_model("och", name, names())
    return ModelSpec(
        mean=OPENAI_MEAN, std=OPENAI_STD, poolings=CNN_POOLINGS, has_text=True, weights=open_clip_weights(*split(name))
    )


def _attnpool_any_size(self, x: torch.Tensor) -> torch.Tensor:
    """open_clip's AttentionPool2d with its position embedding resized to the (h, w) map."""
    n, c, h, w = x.shape
    pos = self.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if (h, w) != (side, side):
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)])
    x = x.reshape(n, c, h * w).permute(2, 0, 1)  # (hw, n, c)
    x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pos[:, None, :].to(x.dtype)
    out, _ = F.multi_head_attention_forward(
        query=x,
        key=x,
        value=x,
        embed_dim_to_check=c,
        num_heads=self.num_heads,
        q_proj_weight=self.q_proj.weight,
        k_proj_weight=self.k_proj.weight,
        v_proj_weight=self.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=self.c_proj.weight,
        out_proj_bias=self.c_proj.bias,
        use_separate_proj_weight=True,
        training=False,
        need_weights=False,
    )
    return out[0]


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    import open_clip

    spec(name)
    oc_name, tag = split(name)
    visual = open_clip.create_model(oc_name, pretrained=open_clip_pretrained(tag, checkpoint, pretrained)).visual.eval()
    visual.attnpool.forward = types.MethodType(_attnpool_any_size, visual.attnpool)

    def trunk(x):
        x = visual.stem(x)
        return visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))

    return Backbone(model=visual, dim=visual.output_dim, mean=OPENAI_MEAN, std=OPENAI_STD, features=trunk)
