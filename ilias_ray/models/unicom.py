"""DeepGlint UNICOM vision transformers (`--framework unicom`), as evaluated by ILIAS.

UNICOM ViTs have no class token. Their position embedding covers the training grid only and is
resized bicubically to the actual patch grid, so any (padded) input size works. The `head`
pooling is the released embedding layer: the normed tokens are average-pooled back to the
training grid, flattened, and sent through a Linear/BatchNorm/Linear/BatchNorm stack. The other
poolings read the normed tokens as a (dim, H*W, 1) map.

Public weights are fp16 state dicts released on GitHub. We download them ourselves into
`$UNICOM_HOME` (default `~/.cache/unicom`), verify their sha256 (also for a file already in the
cache) and read them with `weights_only=True`. The SOP and GLDv2 fine-tunes are not public:
pass them with `--checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ilias_ray.errors import UserError
from ilias_ray.models.base import (
    CNN_POOLINGS,
    OPENAI_MEAN,
    OPENAI_STD,
    Backbone,
    ModelSpec,
    Weights,
    load_into,
    load_state_dict,
    unknown_model,
)
from ilias_ray.storage.cache import verified

POOLINGS = CNN_POOLINGS  # no class token: no `cls`
PREFIXES = ("_orig_mod.", "module.")
_REL = "https://github.com/deepglint/unicom/releases/download"


@dataclass(frozen=True)
class Arch:
    input_size: int
    patch: int
    dim: int
    embedding: int
    depth: int
    heads: int
    url: Optional[str] = None  # None: no public weights
    sha256: Optional[str] = None
    user_file: str = ""  # the expected --checkpoint file of a non-public model


MODELS = {
    "unicom_vit_base_patch32_224": Arch(
        224,
        32,
        768,
        512,
        12,
        12,
        f"{_REL}/b32/FP16-ViT-B-32.pt",
        "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a",
    ),
    "unicom_vit_base_patch16_224": Arch(
        224,
        16,
        768,
        768,
        12,
        12,
        f"{_REL}/b16/FP16-ViT-B-16.pt",
        "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef",
    ),
    "unicom_vit_large_patch14_224": Arch(
        224,
        14,
        1024,
        768,
        24,
        16,
        f"{_REL}/l14/FP16-ViT-L-14.pt",
        "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd",
    ),
    "unicom_vit_large_patch14_336": Arch(
        336,
        14,
        1024,
        768,
        24,
        16,
        f"{_REL}/l14_336px/FP16-ViT-L-14-336px.pt",
        "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea",
    ),
    "unicom_vit_base_patch16_sop": Arch(224, 16, 768, 768, 12, 12, user_file="ViT_B_16_20_test_88.847.pt"),
    "unicom_vit_base_patch16_gldv2": Arch(
        512, 16, 768, 768, 12, 12, user_file="ViT_B_16_GLDv2_test_0.356_val_0.327.pt"
    ),
}


# ----------------------------------------------------------------------------------------------
# The network


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, hd)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor):
        x = self.proj(x)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (h, w)


class UnicomViT(nn.Module):
    def __init__(self, a: Arch):
        super().__init__()
        self.side = a.input_size // a.patch  # the training grid is side x side
        n = self.side**2
        self.patch_embed = PatchEmbed(a.patch, a.dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, a.dim))
        self.blocks = nn.ModuleList([Block(a.dim, a.heads) for _ in range(a.depth)])
        self.norm = nn.LayerNorm(a.dim)
        self.feature = nn.Sequential(
            nn.Linear(a.dim * n, a.dim, bias=False),
            nn.BatchNorm1d(a.dim, eps=2e-5),
            nn.Linear(a.dim, a.embedding, bias=False),
            nn.BatchNorm1d(a.embedding, eps=2e-5),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def tokens(self, x: torch.Tensor):
        """Normed patch tokens (b, h*w, dim), row-major over the (h, w) patch grid."""
        x, (h, w) = self.patch_embed(x)
        d = x.shape[-1]
        pos = self.pos_embed.reshape(1, self.side, self.side, d).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic")
        x = x + pos.flatten(2).transpose(1, 2).to(x.dtype)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x.float()), (h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The released embedding (`--pooling head`)."""
        t, (h, w) = self.tokens(x)
        b, _, d = t.shape
        t = t.reshape(b, h, w, d).permute(0, 3, 1, 2)
        t = F.adaptive_avg_pool2d(t, (self.side, self.side))
        t = t.flatten(2).transpose(1, 2).reshape(b, -1)
        return self.feature(t)


# ----------------------------------------------------------------------------------------------
# Weights


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("UNICOM_HOME") or os.path.join("~", ".cache", "unicom"))


def cached_path(url: str) -> str:
    return os.path.join(cache_dir(), os.path.basename(url))


def fetch(a: Arch) -> str:
    """The verified local copy of `a`'s public weights, downloaded first if need be (storage/cache.py)."""

    def download(tmp: str) -> None:
        try:
            torch.hub.download_url_to_file(a.url, tmp, progress=False)
        except Exception as e:  # network errors: one clear line for the user
            raise UserError(
                f"could not download {a.url} ({e}); download it into {cache_dir()} or pass --checkpoint FILE"
            ) from e

    return verified(cached_path(a.url), download, a.sha256, a.url)


def strip_all(sd: dict) -> dict:
    """Remove wrapper prefixes (`_orig_mod.` of torch.compile, `module.` of DDP), nested in any order."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def load_weights(model: UnicomViT, path: str) -> None:
    sd = strip_all(load_state_dict(path))
    sd = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}
    # BatchNorm's step counter does not affect eval; files saved without it still fit.
    for k in model.state_dict():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.tensor(0, dtype=torch.long)
    load_into(model, sd, path)


# ----------------------------------------------------------------------------------------------
# Framework interface


def names() -> tuple:
    return tuple(sorted(MODELS))


def pad_multiple(name: str) -> int:
    return 14 if "14" in name else 16  # as the reference: patch32 pads to 16 too


def weights(a: Arch) -> Weights:
    if a.url is None:
        return Weights("user checkpoint", None, hint=a.user_file, public=False)
    return Weights(
        a.url, os.path.exists(cached_path(a.url)), hint=f"download {a.url} into {cache_dir()} or pass --checkpoint FILE"
    )


def arch(name: str) -> Arch:
    if name not in MODELS:
        raise unknown_model("unicom", name, names())
    return MODELS[name]


def spec(name: str) -> ModelSpec:
    a = arch(name)
    return ModelSpec(mean=OPENAI_MEAN, std=OPENAI_STD, patch=pad_multiple(name), poolings=POOLINGS, weights=weights(a))


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    a = arch(name)
    if not checkpoint and pretrained and a.url is None:
        raise UserError(f"{name}: no public weights; pass --checkpoint FILE ({a.user_file})")
    path = checkpoint or (fetch(a) if pretrained else None)  # verify before building the (large) model
    if path:
        # Every tensor comes from the file (a strict load), so skip the random init: the 336 px and
        # GLDv2 embedding layers alone hold 600M weights.
        with torch.device("meta"):
            model = UnicomViT(a)
        model = model.to_empty(device="cpu")
        load_weights(model, path)
    else:
        torch.manual_seed(0)  # --pretrained false: every actor builds the same random weights
        model = UnicomViT(a)
    model.eval()
    return Backbone(
        model=model,
        dim=a.embedding,
        mean=OPENAI_MEAN,
        std=OPENAI_STD,
        patch=pad_multiple(name),
        token_pool=False,
        head=model,
        features=model.forward_features,
    )
