"""Pooling of timm ``forward_features`` outputs into global / local descriptors.

Semantics follow the ILIAS reference feature extractor so that features are
comparable with published numbers. Nothing here L2-normalises: the caller
normalises over the last axis after pooling.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ilias_ray import config

__all__ = ["POOLINGS", "pool", "rmac_regions"]

# Every pooling name handled here ("head" bypasses forward_features and is
# handled by the model wrapper instead).
POOLINGS = tuple(p for p in config.POOLINGS if p != "head")

GEM_P = 3.0
GEM_EPS = 1e-6
RMAC_LEVELS = (1, 2, 3)
RMAC_OVERLAP = 0.4


def _gap(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


def _mac(x: torch.Tensor) -> torch.Tensor:
    return x.amax(dim=(2, 3))


def _gem(x: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    # Shift by the (non-positive) per-channel minimum so negative activations
    # (ViT tokens, pre-ReLU maps) are not all clamped to eps. The reference adds
    # m rather than subtracting it; we keep that exactly for comparability.
    m = x.amin(dim=(2, 3), keepdim=True).clamp(max=0)
    pooled = (x + m).clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
    return pooled - m[:, :, 0, 0]


def _grid_edges(size: int, wl: int, wl2: int, n: int) -> List[int]:
    # n evenly spaced window starts along one axis, first at 0, last nominally
    # at size - wl. float32 on purpose: the reference does this in float32 and
    # e.g. 7 * f32(31 / 7) = 30.999998 floors one pixel short; we want the same
    # windows as ILIAS, not the mathematically exact ones.
    step = (size - wl) / (n - 1) if n > 1 else 0.0
    starts = torch.floor(wl2 + torch.arange(n, dtype=torch.float32) * step)
    return [int(v) - wl2 for v in starts.tolist()]


def _extra_windows(W: int, H: int) -> Tuple[int, int]:
    # How many extra windows the long side gets: the step count (2..7) whose
    # overlap is closest to the target; first one on ties, like argmin. float32
    # like the reference, since exact ties (e.g. 11x47) are broken by rounding.
    w = min(W, H)
    steps = torch.arange(2, 8, dtype=torch.float32)
    b = (max(H, W) - w) / (steps - 1)
    idx = int(torch.argmin(torch.abs((w * w - w * b) / (w * w) - RMAC_OVERLAP)))
    if H < W:
        return idx + 1, 0
    # Square maps also land here (Hd = idx + 1 = 1), as in the reference.
    return 0, idx + 1


def rmac_regions(W: int, H: int) -> List[Tuple[int, int, int, int]]:
    """R-MAC regions (left, top, width, height) for a W (width) x H (height) map.

    Level 1 is the whole map; levels 2..3 are square windows laid out on a grid
    with ~40% overlap, with extra windows along the longer side (Tolias et al.).
    Zero-sized windows (maps smaller than the level needs) are dropped, as the
    reference skips them. Order: level, then top, then left.
    """
    w = min(W, H)
    Wd, Hd = _extra_windows(W, H)
    regions: List[Tuple[int, int, int, int]] = []
    for level in RMAC_LEVELS:
        if level == 1:
            regions.append((0, 0, W, H))
            continue
        wl = math.floor(2 * w / (level + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        lefts = _grid_edges(W, wl, wl2, level + Wd)
        tops = _grid_edges(H, wl, wl2, level + Hd)
        for top in tops:
            for left in lefts:
                regions.append((left, top, wl, wl))
    return regions


def _regional(x: torch.Tensor, aggr) -> torch.Tensor:
    H, W = x.shape[2], x.shape[3]
    out = None
    for left, top, rw, rh in rmac_regions(W, H):
        v = aggr(x[:, :, top : top + rh, left : left + rw])
        # Plain sum of unnormalised region vectors (reference behaviour).
        out = v if out is None else out + v
    return out


def pool(name: str, x: torch.Tensor, token_pool: bool) -> torch.Tensor:
    """Pool ``forward_features`` output ``x`` with pooling ``name``.

    x: (b, c, h, w) CNN map, (b, l, d) ViT tokens, or a (class token, (b, c, h, w) map)
    pair. token_pool: the model's
    ``global_pool == "token"``, i.e. x[:, 0] is a class token. Returns float32
    (b, c) for global poolings and (b, n, c) for "local".
    """
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; expected one of {POOLINGS}")
    if isinstance(x, tuple):
        # (class token, (b, c, h, w) patch map): models whose patch tokens keep their 2-D grid.
        cls_token, x = x
        if name == "cls":
            return cls_token.float()
        x = x.float()
    # float32 even under fp16 autocast: GeM's cube and sums overflow/lose
    # precision in half.
    x = x.float()

    if x.ndim == 3:
        cls_token = None
        if token_pool:
            cls_token, x = x[:, 0], x[:, 1:]
        if name == "cls":
            if cls_token is None:
                raise ValueError("cls pooling: model has no class token (global_pool != 'token')")
            return cls_token
        # Tokens become a tall, one-pixel-wide map (b, d, l, 1).
        x = x.transpose(1, 2).unsqueeze(-1)
    elif x.ndim == 4:
        if name == "cls":
            raise ValueError("cls pooling: a CNN feature map has no class token")
    else:
        raise ValueError(f"expected a (b, c, h, w) or (b, l, d) tensor, got shape {tuple(x.shape)}")

    if name == "gap":
        return _gap(x)
    if name == "mac":
        return _mac(x)
    if name == "gem":
        return _gem(x)
    if name == "rmac":
        return _regional(x, _mac)
    if name == "rgem":
        return _regional(x, _gem)
    # local: one descriptor per position, row-major over (h, w).
    return x.flatten(2).transpose(1, 2)
