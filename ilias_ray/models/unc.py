"""UNIC (`--framework unc`): the multi-teacher distilled student of Sariyildiz et al. (ECCV 2024).

No hub serves the weights: `--checkpoint` takes the release file `unic_l.pth`, a dict with
`model` (the whole student: `module.encoder.*` plus the `module.lp.*` projector ladder), `args`
(the training argparse.Namespace, or a plain dict) and `epoch`. The student encoder is UNIC's copy
of DINOv2's vision transformer; we rebuild it with timm (`vit_*_patch14_dinov2`, shapes taken
from the weights), flatten DINOv2's block chunks (`blocks.0.5.*` -> `blocks.5.*`) and let timm's
DINOv2 checkpoint filter map the rest (class-token slot of `pos_embed`, `register_tokens`,
`mask_token`). The descriptor is the encoder's `x_norm_clstoken`. Position embeddings are resized
to the input's patch grid the way the encoder's own code does (bicubic, scale factor with DINOv2's
0.1 offset, no antialias), not timm's way, so features match the reference at every image size.
"""

from __future__ import annotations

import argparse
import math
import re
from typing import Optional

import torch

from ilias_ray.errors import UserError
from ilias_ray.models.base import IMAGENET_MEAN, IMAGENET_STD, Backbone, ModelSpec, Weights, load_into, unknown_model
from ilias_ray.models.fb import use_dino_pos_embed

PATCH = 14
HINT = "the UNIC release checkpoint unic_l.pth (a dict with 'model', 'args', 'epoch')"
# model name -> the encoder's arch, patch size and training image size (for random weights)
MODELS = {"unic_l": ("vit_large", PATCH, 224)}
# DINOv2 arch (UNIC's `args.arch`) -> (timm DINOv2 model used as the template, embed dim, heads)
ARCHS = {
    "vit_tiny": ("vit_small_patch14_dinov2", 192, 3),
    "vit_small": ("vit_small_patch14_dinov2", 384, 6),
    "vit_base": ("vit_base_patch14_dinov2", 768, 12),
    "vit_large": ("vit_large_patch14_dinov2", 1024, 16),
    "vit_giant": ("vit_giant_patch14_dinov2", 1536, 24),
    "vit_giant2": ("vit_giant_patch14_dinov2", 1536, 24),
}


def names() -> tuple:
    return tuple(MODELS)


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise unknown_model("unc", name, names())
    return ModelSpec(
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        patch=MODELS[name][1],
        poolings=("head",),
        weights=Weights("user checkpoint", None, hint=HINT, public=False),
    )


# ---------------------------------------------------------------- reading the release file


def _numpy_globals() -> list:
    """numpy arrays/scalars (UNIC's args carry numpy lr schedules): data only, no code to run."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray

    out = [np.ndarray, np.dtype]
    for fn in (multiarray._reconstruct, multiarray.scalar):
        # numpy 1 pickles name numpy.core, numpy 2 pickles numpy._core
        out += [(fn, f"numpy.core.multiarray.{fn.__name__}"), (fn, f"numpy._core.multiarray.{fn.__name__}")]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_):
        out.append(type(np.dtype(t)))
    return out


def read_checkpoint(path: str):
    """torch.load with weights_only=True, allowing the `args` Namespace (and numpy data in it)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *_numpy_globals()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"--checkpoint {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - any unpickling refusal is the user's file
        try:
            bad = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001
            bad = []
        why = f"it needs {', '.join(bad)}" if bad else f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        raise UserError(f"--checkpoint {path} cannot be read safely (weights_only=True): {why}") from None


def checkpoint_args(obj) -> dict:
    """The training arguments of a UNIC checkpoint as a dict ({} when absent)."""
    args = obj.get("args") if isinstance(obj, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def encoder_state_dict(obj, path: str) -> dict:
    """The student encoder's weights under DINOv2 names, block chunks flattened."""
    if not isinstance(obj, dict):
        raise UserError(f"--checkpoint {path} is not a UNIC checkpoint (expected a dict with 'model')")
    sd = obj.get("model", obj)
    if not isinstance(sd, dict):
        raise UserError(f"--checkpoint {path}: 'model' is not a state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if any("encoder." in k for k in tensors):  # the whole student, as UNIC saves it
        tensors = {k.replace("module.", "").replace("encoder.", ""): v for k, v in tensors.items() if "encoder." in k}
    else:  # a bare encoder state dict
        tensors = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in tensors.items()}
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if key not in tensors:
            raise UserError(f"--checkpoint {path} does not hold a UNIC encoder: no encoder key {key!r}")
    # DINOv2 block chunks: `blocks.<chunk>.<i>.` where i is the global block index
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in tensors.items()}


# ---------------------------------------------------------------- the encoder


def _create(arch: str, patch: int, grid: int, depth=None, layerscale=False, reg=0, mlp_ratio=None):
    import timm

    if arch not in ARCHS:
        raise UserError(f"UNIC encoder arch {arch!r} is not supported (known: {', '.join(ARCHS)})")
    template, dim, heads = ARCHS[arch]
    kwargs = dict(
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        img_size=grid * patch,
        patch_size=patch,
        embed_dim=dim,
        num_heads=heads,
        init_values=1e-5 if layerscale else None,
    )
    if depth is not None:
        kwargs["depth"] = depth
    if mlp_ratio is not None:
        kwargs["mlp_ratio"] = mlp_ratio
    if reg:
        kwargs.update(reg_tokens=reg, no_embed_class=True)
    return timm.create_model(template, **kwargs)


def _arch_from(args: dict, embed_dim: int, path: str) -> str:
    arch = args.get("arch")
    if arch is None:  # no args: the embedding width names the size
        by_dim = {dim: a for a, (_, dim, _) in reversed(ARCHS.items())}
        if embed_dim not in by_dim:
            raise UserError(f"--checkpoint {path}: no 'args' and no known arch of width {embed_dim}")
        arch = by_dim[embed_dim]
    if arch not in ARCHS:
        raise UserError(f"--checkpoint {path}: encoder arch {arch!r} is not supported (known: {', '.join(ARCHS)})")
    return arch


def encoder_from_checkpoint(path: str) -> torch.nn.Module:
    obj = read_checkpoint(path)
    args = checkpoint_args(obj)
    sd = encoder_state_dict(obj, path)
    embed_dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    if args.get("patch_size") not in (None, patch):
        raise UserError(f"--checkpoint {path}: args.patch_size={args['patch_size']} but the weights have patch {patch}")
    n = sd["pos_embed"].shape[1] - 1  # DINOv2 keeps a class-token slot
    grid = math.isqrt(max(n, 0))
    if grid * grid != n:
        raise UserError(f"--checkpoint {path}: pos_embed has {n} patch positions, not a square grid")
    depth = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    swiglu = any(".mlp.w12." in k for k in sd)
    fc1 = sd.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = None if swiglu or fc1 is None else fc1.shape[0] / embed_dim
    arch = _arch_from(args, embed_dim, path)
    if embed_dim != ARCHS[arch][1]:  # the head count comes from the arch: a wrong one would load but mislead
        raise UserError(
            f"--checkpoint {path} does not fit the UNIC encoder ({arch}): "
            f"the weights are {embed_dim} wide, {arch} is {ARCHS[arch][1]}"
        )
    if swiglu != (ARCHS[arch][0] == "vit_giant_patch14_dinov2"):
        raise UserError(f"--checkpoint {path}: the encoder's feed-forward layers do not fit arch {arch!r}")
    reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    model = _create(
        arch, patch, grid, depth=depth, layerscale=any(".ls1.gamma" in k for k in sd), reg=reg, mlp_ratio=mlp_ratio
    )
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = dict(sd)
    sd.setdefault("mask_token", torch.zeros(1, embed_dim))  # selects timm's DINOv2 conversion
    try:
        load_into(model, checkpoint_filter_fn(sd, model), path)
    except RuntimeError as e:  # shape mismatch
        raise UserError(
            f"--checkpoint {path} does not fit the UNIC encoder ({arch}): {str(e).splitlines()[-1].strip()[:300]}"
        ) from None
    return model


def build(
    name: str, *, checkpoint: Optional[str] = None, pretrained: bool = True, trust_remote_code: bool = False
) -> Backbone:
    s = spec(name)
    if checkpoint:
        model = encoder_from_checkpoint(str(checkpoint))
    elif pretrained:
        raise UserError(f"{name}: no public weights; pass --checkpoint unic_l.pth ({HINT})")
    else:
        arch, patch, size = MODELS[name]
        torch.manual_seed(0)  # every actor builds the same random weights
        model = _create(arch, patch, size // patch)
    model.eval()
    use_dino_pos_embed(model)  # UNIC's encoder is DINOv2's

    def head(x, f=model.forward_features):
        return f(x)[:, 0]  # x_norm_clstoken

    return Backbone(
        model=model, dim=model.num_features, mean=s.mean, std=s.std, patch=model.patch_embed.patch_size[0], head=head
    )
