"""CVNet and SuperGlobal global descriptors (`--framework cvn`), as the ILIAS benchmark runs them.

Both are a pycls-style ResNet-50/101 whose weights come from the CVNet release checkpoints
(`CVPR2022_CVNet_R50.pyth`, `CVPR2022_CVNet_R101.pyth`; the encoder under `model_state`, keys
prefixed `encoder_q.`). No public hub serves them, so `--checkpoint FILE` is required; SuperGlobal
reuses the CVNet file of the same depth. Only `--pooling head` is offered:

- CVNet: GeM (learnable p) over the last map, then `head.fc`;
- SuperGlobal: regional GeM (LPPool, p=2.5, 5x5, stride 1, reflection padded) averaged with the
  map, then GeM+ (p=4.4) over all positions, L2 normalisation, then `head.fc`.

The networks were trained on BGR input: the head flips the channels of the normalised RGB tensor.
Activations are "clamps" (ReLU with a floor `alpha`), with the floors of the reference as run.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ilias_ray.errors import UserError
from ilias_ray.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    ModelSpec,
    Weights,
    load_into,
    load_state_dict,
    strip_prefixes,
    unknown_model,
)

DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
WIDTHS = (256, 512, 1024, 2048)  # stage outputs
BOTTLENECKS = (64, 128, 256, 512)
STRIDES = (1, 2, 2, 2)
FLOOR = 0.014  # the clamp floor of the reference's activations
GEM_P = 3.0  # initial value of head.pool.p
GEMP_P = 4.4  # SuperGlobal's GeM+ exponent
RGEM_P = 2.5  # SuperGlobal's regional GeM (LPPool) exponent
RGEM_SIZE = 5

# name -> (depth, superglobal)
MODELS = {
    "cvnet_resnet50": (50, False),
    "cvnet_resnet101": (101, False),
    "superglobal_resnet50": (50, True),
    "superglobal_resnet101": (101, True),
}
POOLINGS = ("head",)


def names() -> tuple:
    return tuple(sorted(MODELS))


def checkpoint_file(name: str) -> str:
    depth, _ = MODELS[name]
    return f"CVPR2022_CVNet_R{depth}.pyth"


def hint(name: str) -> str:
    depth, sg = MODELS[name]
    same = f"; SuperGlobal uses the CVNet checkpoint, the same file as cvnet_resnet{depth}" if sg else ""
    return (
        f"the CVNet release checkpoint {checkpoint_file(name)} (a torch file whose model_state holds the "
        f"encoder_q. weights){same}"
    )


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise unknown_model("cvn", name, names())
    return ModelSpec(
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch=0,
        poolings=POOLINGS,
        weights=Weights(source="user checkpoint", cached=None, hint=hint(name), public=False),
    )


# ---------------------------------------------------------------------------------------------
# Activation floors, as the reference actually runs them (both CVNet and SuperGlobal).


def inner_alpha(w_out: int) -> float:
    """Floor of the activations inside a bottleneck (after f.a_bn and f.b_bn)."""
    return FLOOR if w_out == 256 else 0.0


def out_alpha(w_out: int) -> float:
    """Floor of the activation after the residual sum."""
    return 0.0 if w_out == 2048 else FLOOR


class Clamp(nn.Module):
    """ReLU with a floor: clamp(x, min=alpha)."""

    def __init__(self, alpha: float):
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x):
        return x.clamp(min=self.alpha)

    def extra_repr(self):
        return f"alpha={self.alpha}"


# ---------------------------------------------------------------------------------------------
# The pycls ResNet (parameter names as in the checkpoint).


def _bn(w: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(w, eps=1e-5, momentum=0.1)


class Stem(nn.Module):
    def __init__(self, w_out: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(3, w_out, 7, stride=2, padding=3, bias=False)
        self.bn = _bn(w_out)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        return self.pool(self.relu(self.bn(self.conv(x))))


class Bottleneck(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        alpha = inner_alpha(w_out)
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = _bn(w_b)
        self.a_act = Clamp(alpha)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = _bn(w_b)
        self.b_act = Clamp(alpha)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = _bn(w_out)

    def forward(self, x):
        x = self.a_act(self.a_bn(self.a(x)))
        x = self.b_act(self.b_bn(self.b(x)))
        return self.c_bn(self.c(x))


class ResBlock(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        self.proj_block = w_in != w_out or stride != 1
        if self.proj_block:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = _bn(w_out)
        self.f = Bottleneck(w_in, w_out, stride, w_b)
        self.act = Clamp(out_alpha(w_out))

    def forward(self, x):
        if self.proj_block:
            x = self.bn(self.proj(x)) + self.f(x)
        else:
            x = x + self.f(x)
        return self.act(x)


class Stage(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int, depth: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class GeM(nn.Module):
    """GeM with a learnable exponent `p` (shape (1,))."""

    def __init__(self, p: float = GEM_P, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return gem(x, self.p, self.eps)


class Head(nn.Module):
    def __init__(self, w_in: int = 2048, dim: int = 2048):
        super().__init__()
        self.pool = GeM()
        self.fc = nn.Linear(w_in, dim, bias=True)


# ---------------------------------------------------------------------------------------------
# Descriptor math.


def gem(x: torch.Tensor, p, eps: float = 1e-6) -> torch.Tensor:
    """(b, c, h, w) -> (b, c, 1, 1): mean(x.clamp(eps) ** p) ** (1/p)."""
    x = x.float()
    return F.adaptive_avg_pool2d(x.clamp(min=eps).pow(p), 1).pow(1.0 / p)


def rgem(x: torch.Tensor) -> torch.Tensor:
    """SuperGlobal's regional GeM: 0.5 * LPPool(2.5, 5x5, stride 1) of the reflection-padded map
    (scaled by 25 ** (-1/2.5), i.e. a generalised mean over each 5x5 window) plus 0.5 * the map.
    Maps smaller than 5x5 pass unchanged."""
    if x.shape[-2] < RGEM_SIZE or x.shape[-1] < RGEM_SIZE:
        return x
    x = x.float()
    scale = float(RGEM_SIZE * RGEM_SIZE) ** (1.0 / RGEM_P)
    pad = F.pad(x / scale, (RGEM_SIZE // 2,) * 4, mode="reflect")
    pooled = F.lp_pool2d(pad, RGEM_P, RGEM_SIZE, stride=1)
    return 0.5 * pooled + 0.5 * x


def gem_plus(x: torch.Tensor, p: float = GEMP_P, eps: float = 1e-8) -> torch.Tensor:
    """SuperGlobal's GeM+ over all positions: (b, c, h, w) -> (b, c)."""
    x = x.float().flatten(2)
    return x.clamp(min=eps).pow(p).mean(dim=-1).pow(1.0 / p)


def superglobal_pool(x: torch.Tensor) -> torch.Tensor:
    """The SuperGlobal descriptor before `head.fc`: rgem, GeM+, L2 normalisation -> (b, c)."""
    return F.normalize(gem_plus(rgem(x)), p=2, dim=1)


class CVNetGlobal(nn.Module):
    """The CVNet encoder with its global head. `forward` takes a BGR (channel-flipped) tensor, as
    the reference does; `embed` takes the normalised RGB tensor and flips it."""

    def __init__(self, depth: int = 50, superglobal: bool = False):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {tuple(DEPTHS)}")
        self.depth = depth
        self.superglobal = superglobal
        self.stem = Stem(64)
        w_in = 64
        for k, (d, w_out, w_b, s) in enumerate(zip(DEPTHS[depth], WIDTHS, BOTTLENECKS, STRIDES)):
            self.add_module(f"s{k + 1}", Stage(w_in, w_out, s, w_b, d))
            w_in = w_out
        self.head = Head(w_in, 2048)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.s4(self.s3(self.s2(self.s1(x))))

    def descriptor(self, x4: torch.Tensor) -> torch.Tensor:
        if self.superglobal:
            v = superglobal_pool(x4)
        else:
            v = self.head.pool(x4).flatten(1)
        return self.head.fc(v)

    def forward(self, x_bgr: torch.Tensor) -> torch.Tensor:
        return self.descriptor(self.trunk(x_bgr))

    def embed(self, x_rgb: torch.Tensor) -> torch.Tensor:
        return self(x_rgb.flip(1))


# ---------------------------------------------------------------------------------------------
# Loading.

PREFIXES = ("module.encoder_q.", "encoder_q.")


def checkpoint_state(path: str) -> dict:
    """The encoder weights of a CVNet release checkpoint (or of a plain state_dict of this model)."""
    sd = load_state_dict(path)  # torch.load(weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model_state"), dict):
        sd = sd["model_state"]
    if not isinstance(sd, dict):
        raise UserError(f"--checkpoint {path} is not a state dict (expected a CVNet .pyth with model_state)")
    return strip_prefixes(sd, PREFIXES)


def load_checkpoint(model: CVNetGlobal, path: str) -> None:
    """Load the keys of `model` from `path`; the checkpoint's other modules (the momentum encoder,
    the correlation/rerank modules, ...) are ignored, any missing key of ours is a UserError."""
    sd = checkpoint_state(path)
    own = model.state_dict()
    picked = {k: v for k, v in sd.items() if k in own}
    # BatchNorm's step counters do not affect eval-mode outputs; older files may lack them.
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in picked:
            picked[k] = v
    bad = [k for k, v in picked.items() if not torch.is_tensor(v) or v.shape != own[k].shape]
    if bad:
        raise UserError(
            f"--checkpoint {path} does not fit the model: {len(bad)} key(s) with another shape "
            f"(e.g. {', '.join(bad[:3])}); expected CVPR2022_CVNet_R{model.depth}.pyth"
        )
    try:
        load_into(model, picked, path)
    except UserError as e:
        raise UserError(f"{e}; expected CVPR2022_CVNet_R{model.depth}.pyth") from None


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    s = spec(name)
    depth, superglobal = MODELS[name]
    if not checkpoint and pretrained:
        raise UserError(f"{name}: the weights are not public; pass --checkpoint FILE ({s.weights.hint})")
    torch.manual_seed(0)  # --pretrained false: every actor builds the same random weights
    model = CVNetGlobal(depth, superglobal)
    with torch.no_grad():
        model.head.pool.p.fill_(GEM_P)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    model.eval()
    return Backbone(
        model=model,
        dim=model.head.fc.out_features,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch=0,
        head=model.embed,
        features=None,
    )
