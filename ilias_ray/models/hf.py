"""Hugging Face CLIP/SigLIP vision towers (`--framework hf`), through `transformers`.

The model name is a hub repo id (`google/siglip-base-patch16-224`, `openai/clip-vit-base-patch16`,
...). The descriptor is the image embedding that the model's `get_image_features` returns: the
vision tower's pooled output (SigLIP's attention-pooling head; CLIP's class token after
`post_layernorm`) followed by the image projection where the model has one. As in the ILIAS
reference, every hf model takes mean = std = 0.5 inputs, and the position embeddings are resampled
to the (padded) input's patch grid with timm's `resample_abs_pos_embed` (bicubic, antialias);
unlike the reference, which always passes `num_prefix_tokens=0` (right for SigLIP only), the
model's real prefix count is used (1 for CLIP's class token).

Weights: the hub (or its local cache), or `--checkpoint DIR`, a directory written by
`save_pretrained` (config.json + model.safetensors); a weights file that sits beside a
config.json also works. Remote code is never run: the model class comes from transformers itself.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

from ilias_ray.errors import UserError
from ilias_ray.models.base import (
    Backbone,
    ModelSpec,
    Weights,
    hf_cached,
    hf_hint,
    load_into,
    load_state_dict,
    unknown_model,
)

MEAN = STD = (0.5, 0.5, 0.5)
KNOWN = (
    "google/siglip-base-patch16-224",
    "google/siglip-so400m-patch14-384",
    "openai/clip-vit-base-patch16",
    "openai/clip-vit-large-patch14",
)


def names() -> tuple:
    return KNOWN


def patch_of(name: str) -> int:
    """The patch size in a hub id (`...patch14...`); 16 when the id does not say."""
    m = re.search(r"patch(\d+)", name)
    return int(m.group(1)) if m else 16


def _cached(name: str):
    try:
        return hf_cached(name)
    except Exception:  # noqa: BLE001 - an id the hub client rejects
        raise UserError(f"--framework hf: {name!r} is not a valid hub repo id (org/name)") from None


def spec(name: str) -> ModelSpec:
    if name not in KNOWN and not re.fullmatch(r"[\w.\-]+/[\w.\-]+", name):
        raise unknown_model("hf", name, names())
    return ModelSpec(
        mean=MEAN,
        std=STD,
        patch=patch_of(name),
        poolings=("head",),
        weights=Weights(f"hf-hub:{name}", _cached(name), hf_hint(name)),
    )


# ---------------------------------------------------------------- loading


def _model_class(config):
    """The transformers class the config names (e.g. CLIPVisionModelWithProjection), else AutoModel."""
    import transformers

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _config(src: str, what: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src)  # trust_remote_code stays False
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{what}: cannot read the model config ({str(e).splitlines()[0][:200]})") from None


def _from_pretrained(src: str, what: str):
    config = _config(src, what)
    try:
        return _model_class(config).from_pretrained(src, config=config, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{what}: cannot load the weights ({str(e).splitlines()[0][:200]})") from None


def _from_file(path: str):
    """A weights file (safetensors, or a weights_only-loadable .bin) beside its config.json."""
    config = _config(os.path.dirname(os.path.abspath(path)), f"--checkpoint {path}")
    model = _model_class(config)._from_config(config, dtype=torch.float32)
    try:
        load_into(model, load_state_dict(path), path)
    except RuntimeError as e:  # shape mismatch
        why = str(e).splitlines()[-1].strip()[:300]
        raise UserError(f"--checkpoint {path} does not fit the model: {why}") from None
    return model


def load(name: str, ckpt: Optional[str], pretrained: bool):
    if ckpt:
        ckpt = str(ckpt)
        if os.path.isdir(ckpt):
            if not os.path.isfile(os.path.join(ckpt, "config.json")):
                raise UserError(f"--checkpoint {ckpt}: no config.json (pass a directory written by save_pretrained)")
            return _from_pretrained(ckpt, f"--checkpoint {ckpt}")
        if os.path.isfile(ckpt):
            if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(ckpt)), "config.json")):
                raise UserError(
                    f"--checkpoint {ckpt}: hf models need a directory written by save_pretrained "
                    "(config.json + model.safetensors)"
                )
            return _from_file(ckpt)
        raise UserError(f"--checkpoint {ckpt}: no such file or directory")
    if pretrained:
        return _from_pretrained(name, f"{name} ({hf_hint(name)})")
    # Random weights need the architecture, i.e. the hub config (cached or online).
    config = _config(name, f"{name}: random weights need the hub config; hf models need --checkpoint DIR or hub access")
    torch.manual_seed(0)  # every actor builds the same random weights
    return _model_class(config)._from_config(config, dtype=torch.float32)


# ---------------------------------------------------------------- the image tower


def _embeddings(vision: torch.nn.Module):
    for m in vision.modules():
        if (
            isinstance(getattr(m, "position_embedding", None), torch.nn.Embedding)
            and isinstance(getattr(m, "patch_embedding", None), torch.nn.Conv2d)
            and callable(getattr(m, "interpolate_pos_encoding", None))
        ):
            return m
    return None


class ImageTower(torch.nn.Module):
    """Pixels -> the image embedding of `get_image_features`, position embeddings resampled with timm."""

    def __init__(self, model: torch.nn.Module, name: str = ""):
        super().__init__()
        self.vision = getattr(model, "vision_model", model)
        self.proj = getattr(model, "visual_projection", None)  # CLIP; SigLIP has none
        emb = _embeddings(self.vision)
        if emb is None:
            raise UserError(
                f"--framework hf: {name or type(model).__name__} ({type(model).__name__}) is not a "
                "CLIP/SigLIP-style vision tower"
            )
        if getattr(getattr(self.vision, "config", None), "vision_use_head", True) is False:
            raise UserError(f"--framework hf: {name} has no pooling head (vision_use_head=False)")
        self.patch = emb.patch_embedding.kernel_size[0]
        # the embedding's width: CLIP's projection, else the pooled output (the tokens' width)
        self.dim = self.proj.out_features if self.proj is not None else emb.patch_embedding.out_channels
        grid = emb.image_size // self.patch
        self.prefix = emb.position_embedding.num_embeddings - grid * grid  # 1: CLIP's class token
        table = emb.position_embedding
        patch, prefix = self.patch, self.prefix

        def pos_embed(embeddings, height, width):
            from timm.layers import resample_abs_pos_embed

            return resample_abs_pos_embed(
                table.weight.unsqueeze(0), new_size=(height // patch, width // patch), num_prefix_tokens=prefix
            )

        emb.interpolate_pos_encoding = pos_embed  # called by the embeddings when interpolate_pos_encoding=True
        self._resample = pos_embed  # a plain function attribute (the embeddings stay a submodule of `vision` only)

    def pos_embed_shape(self, height: int, width: int) -> tuple:
        """The shape of the position table used for a (height, width) input."""
        return tuple(self._resample(None, height, width).shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=x, interpolate_pos_encoding=True)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        return self.proj(pooled) if self.proj is not None else pooled


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    s = spec(name)
    tower = ImageTower(load(name, checkpoint, pretrained), name).eval()
    return Backbone(model=tower, dim=tower.dim, mean=s.mean, std=s.std, patch=tower.patch, head=tower)
