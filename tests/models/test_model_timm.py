"""ilias_ray.models.timm_models (spec 5: the name decides) checked against the spec's rules and
timm's own model objects (see tests/reference.py for the ground rules).

From block 5. the model stage of the former tests/test_math.py: the name rules (projection head
kept, ViT, patch size), the kwargs given to timm.create_model, CLIP-style models keeping their
head and their own mean/std, the built models' mean/std and padding, and `cls` pooling being
refused for a CNN.
"""

from __future__ import annotations

import pytest
import torch

import stage_settings as stages
from ilias_ray.models import timm_models
from reference import CNN, IMAGENET_MEAN, IMAGENET_STD, VIT, embedder, make_cfg, rng_pixels


def test_model_name_rules():
    for n in [
        "vit_large_patch14_clip_336.openai",
        "convnext_large_mlp.clip_laion2b_ft_soup_320",
        "eva02_large_patch14_clip_336.merged2b",
        "vit_pe_core_base_patch16_224.fb",
        "RN50_clip",
    ]:
        assert timm_models.keeps_head(n), n
    for n in [
        "vit_large_patch16_siglip_384.webli",
        "resnet50",
        "vit_base_patch14_dinov2.lvd142m",
        "convnext_base",
        VIT,
        CNN,
    ]:
        assert not timm_models.keeps_head(n), n
    for n in ["vit_base_patch16_224", "eva02_large_patch14_clip_336", "deit_small_patch16_224", "test_vit"]:
        assert timm_models.is_vit(n), n
    for n in ["resnet18", "convnext_base", "mobilenetv3_small_050", "efficientnet_b0"]:
        assert not timm_models.is_vit(n), n
    assert timm_models.patch_size("vit_base_patch16_224") == 16
    assert timm_models.patch_size("deit_small_patch16_224") == 16
    assert timm_models.patch_size("vit_large_patch14_clip_336") == 14
    assert timm_models.patch_size("eva02_large_patch14_clip_336") == 14
    assert timm_models.patch_size("vit_base_patch32_clip_224") == 14  # spec: 16 iff "patch16", else 14


@pytest.mark.parametrize(
    "name,num_classes_zero,dynamic",
    [
        ("vit_large_patch16_siglip_384.webli", True, True),
        ("convnext_large_mlp.clip_laion2b_ft_soup_320", False, False),
        ("eva02_large_patch14_clip_336.merged2b", False, True),
        ("vit_pe_core_large_patch14_336.fb", False, True),
        ("resnet50", True, False),
        ("deit_small_patch16_224", True, True),
    ],
)
def test_create_kwargs(monkeypatch, name, num_classes_zero, dynamic):
    seen = {}

    def fake_create(n, **kw):
        seen.update(kw, name=n)
        return torch.nn.Identity()

    monkeypatch.setattr(timm_models.timm, "create_model", fake_create)
    timm_models.create(name, pretrained=False)
    assert seen["name"] == name
    if num_classes_zero:
        assert seen.get("num_classes") == 0
    else:
        assert "num_classes" not in seen  # timm's default (the projection head)
    assert bool(seen.get("dynamic_img_size", False)) == dynamic


@pytest.mark.parametrize("name", ["vit_xsmall_patch16_clip_224", "vit_pe_core_tiny_patch16_384"])
def test_clip_models_keep_head(name):
    import timm

    default = timm.create_model(name, pretrained=False).num_classes
    assert default > 0
    emb = embedder(model=name, resolution=32)
    assert emb.bb.model.num_classes == default
    # its own mean/std (the OpenAI-CLIP constants for this CLIP-style model)
    assert tuple(emb.bb.mean) == tuple(emb.bb.model.pretrained_cfg["mean"])
    assert tuple(emb.bb.std) == tuple(emb.bb.model.pretrained_cfg["std"])
    if "clip" in name:
        assert tuple(emb.bb.mean) == (0.48145466, 0.4578275, 0.40821073)
        assert tuple(emb.bb.std) == (0.26862954, 0.26130258, 0.27577711)
    out = emb.embed_pixels(torch.from_numpy(rng_pixels(1, 1, 32, 32, 3)))
    assert out.shape == (1, default)


def test_built_models_and_mean_std():
    vit = embedder(model=VIT, pooling="head", resolution=64)
    m = vit.bb.model
    assert m.num_classes == 0 and m.dynamic_img_size
    assert vit.bb.patch == 16 and vit.bb.token_pool
    assert tuple(vit.bb.mean) == tuple(m.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(vit.bb.std) == tuple(m.pretrained_cfg["std"]) == (0.5, 0.5, 0.5)
    cnn = embedder(model=CNN, pooling="gem", resolution=64)
    assert cnn.bb.model.num_classes == 0 and cnn.bb.patch == 0
    assert tuple(cnn.bb.mean) == IMAGENET_MEAN and tuple(cnn.bb.std) == IMAGENET_STD


def test_cls_pooling_needs_vit():
    from ilias_ray.errors import UserError
    from ilias_ray.models.registry import check

    with pytest.raises(UserError, match="not supported"):
        check("timm", CNN, pooling="cls", pretrained=False)  # refused on the driver, before Ray
    emb = stages.embedder(make_cfg(model=CNN, pooling="cls"))
    with pytest.raises(ValueError, match="class token"):
        emb.embed_pixels(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))
