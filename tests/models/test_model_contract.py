"""The framework contract, generated from the registry (as timm's tests are from `list_models()`).

Every module in `FRAMEWORKS` gets these cases without anyone listing it: it is a `Framework` (the
Protocol, signatures and types included), unknown model names are one-line UserErrors, and `build`
with seeded random weights (or a checkpoint the test writes) gives a Backbone in eval mode whose
`head` output has the width it declares (`Backbone.dim`), on a tiny input. No network.
"""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

import ilias_ray.models.registry as M
from ilias_ray.config import FRAMEWORKS
from ilias_ray.errors import UserError
from ilias_ray.models.base import Backbone, Framework
from ilias_ray.models.registry import framework

# The models built here, per framework. A framework not listed builds every name it knows, so a new
# framework is covered at once; list it here when some of its models are too large for CI's 2 cores.
PICKS = {
    # thousands of names; `recall_64-resnet18`: a benchmark-style name with its own embedding layer
    "timm": ("vit_tiny_patch16_224", "resnet18", "recall_64-resnet18"),
    # ~80 names; skipped: the large ones (VGG, ViT, Swin, RegNet-*gf, ...) and those with no feature trunk
    # known (MaxViT, MNASNet): they fail at build, see drop_classifier/trunk
    "tv": ("alexnet", "resnet18", "densenet121", "squeezenet1_1"),
    # skipped: RN101 and RN50x4..RN50x64 (120M-620M parameters)
    "och": ("RN50.openai",),
    # skipped: the ViT-B/L/g/H+/7B (86M-7B parameters); swav and dino_resnet50 are the same ResNet-50
    # loaded the same way as mocov3_resnet50, and mocov3_vitb16 is a ViT-B
    "fb": ("dino_vits16", "dinov2_vits14_reg", "dinov3_vits16", "mocov3_resnet50"),
    # skipped: the ResNet-101s (built, not run, in test_model_cvn.py); SuperGlobal is CVNet's network with
    # another pooling (run in test_model_cvn.py)
    "cvn": ("cvnet_resnet50",),
    # skipped: the other ViT-B/16s (200M-700M parameters with their embedding layer) and the L/14s (up to 900M)
    "unicom": ("unicom_vit_base_patch32_224",),
    # random unic_l is a ViT-L (300M): built from a 1-block ViT-S checkpoint instead (below)
    "unc": ("unic_l",),
    # random weights need the hub config: built from tiny save_pretrained directories instead (below)
    "hf": ("google/siglip-base-patch16-224", "openai/clip-vit-base-patch16"),
    # skipped: the ViT-B/L and SigLIP text towers (large, and SigLIP's tokenizers come from the hub)
    "text": ("RN50.openai",),
}


def unic_checkpoint(tmp_path, name) -> str:
    from test_model_unc_hf import dinov2_layout, tiny_encoder, unic_file

    enc = dinov2_layout(tiny_encoder(False, seed=3))
    return unic_file(tmp_path / "unic_l.pth", enc, {"arch": "vit_small", "patch_size": 14, "image_size": 56})


def hf_checkpoint(tmp_path, name) -> str:
    from test_model_unc_hf import tiny_hf

    kind = "siglip" if "siglip" in name else "clip"
    tiny_hf(kind, seed=7).save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


# Frameworks whose models are built from a checkpoint the test writes, not from random weights.
CHECKPOINTS = {"unc": unic_checkpoint, "hf": hf_checkpoint}


UNKNOWN = "no_such_model_9"


def cases() -> list:
    return [(fw, model) for fw in sorted(FRAMEWORKS) for model in PICKS.get(fw) or framework(fw).names()]


def test_picks_name_registered_frameworks():
    assert set(PICKS) <= set(FRAMEWORKS) and set(CHECKPOINTS) <= set(FRAMEWORKS)


def shape(fn) -> list:
    """(name, kind, default) of each parameter, `self` left out."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("fw", sorted(FRAMEWORKS))
def test_module_is_a_framework(fw):
    mod = framework(fw)
    assert isinstance(mod, Framework)
    for method in ("names", "spec", "build"):
        want, got = getattr(Framework, method), getattr(mod, method)
        assert shape(got) == shape(want), f"{fw}.{method}{inspect.signature(got)}"
        assert typing.get_type_hints(got) == typing.get_type_hints(want), f"{fw}.{method}"
    names = mod.names()
    assert isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)
    for name in names if len(names) <= 100 else PICKS.get(fw, names[:100]):  # timm: thousands
        assert mod.spec(name).poolings, name


def one_line(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and UNKNOWN in msg, msg
    return msg


@pytest.mark.parametrize("fw", sorted(FRAMEWORKS))
def test_unknown_model_is_a_one_line_user_error(fw):
    mod = framework(fw)
    assert f"--framework {fw} has no model" in one_line(lambda: mod.spec(UNKNOWN))
    one_line(lambda: mod.build(UNKNOWN, pretrained=False))
    one_line(lambda: M.build(fw, UNKNOWN, pretrained=False))
    one_line(lambda: M.check(fw, UNKNOWN, pooling="head", pretrained=False))


def tiny_input(patch: int) -> torch.Tensor:
    side = -(-64 // patch) * patch if patch else 64  # padded to the Backbone's multiple, as the Embedder does
    return torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fw,model", cases())
def test_build_gives_the_declared_width(fw, model, tmp_path):
    mod = framework(fw)
    spec = mod.spec(model)
    write = CHECKPOINTS.get(fw)
    bb = mod.build(model, checkpoint=write(tmp_path, model) if write else None, pretrained=False)
    assert isinstance(bb, Backbone) and not bb.model.training
    assert isinstance(bb.dim, int) and bb.dim > 0
    with torch.no_grad():
        if bb.tokenizer is not None:  # a text tower
            f = bb.model.encode_text(bb.tokenizer(["a red mug", "the eiffel tower at night"]))
        else:
            f = bb.head(tiny_input(bb.patch))
            assert callable(bb.features) or set(spec.poolings) == {"head"}
    assert f.shape == (2, bb.dim) and torch.isfinite(f).all()
