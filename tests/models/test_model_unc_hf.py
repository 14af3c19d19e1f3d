"""`--framework unc` (UNIC release checkpoints) and `--framework hf` (transformers CLIP/SigLIP towers).

Tiny models only: features are checked against independent computations, never against a download.
"""

from __future__ import annotations

import argparse
import dataclasses
import fractions
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import ilias_ray.config
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.models.base import IMAGENET_MEAN, IMAGENET_STD
from ilias_ray.models.registry import check, framework
from ilias_ray.stages.embed import pad_to_multiple
from stage_settings import embedder

BASE = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))


PIXELS = torch.randint(0, 256, (2, 75, 101, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def frameworks(monkeypatch):
    monkeypatch.setitem(ilias_ray.config.FRAMEWORKS, "unc", "ilias_ray.models.unc")
    monkeypatch.setitem(ilias_ray.config.FRAMEWORKS, "hf", "ilias_ray.models.hf")


def cfg(fw, model, **kw):
    return dict(
        BASE, **{"framework": fw, "model": model, "pretrained": False, "pooling": "head", "resolution": 100, **kw}
    )


def normed(pixels, mean, std):
    x = pixels.permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def tiny_encoder(reg: bool, seed: int):
    """A 2-block ViT-S/14 at 56 px in timm (with registers and layer scale for reg)."""
    torch.manual_seed(seed)
    name = "vit_small_patch14_reg4_dinov2" if reg else "vit_small_patch14_dinov2"
    m = timm.create_model(
        name,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        img_size=56,
        depth=2,
        init_values=1e-5 if reg else None,
    ).eval()
    with torch.no_grad():  # a class token that starts at 0 pools every patch: its output depends on them all
        m.pos_embed.normal_(0, 1)
        m.cls_token.zero_()
        if not reg:
            m.pos_embed[:, 0] = 0
        else:
            m.reg_token.normal_(0, 0.5)
            for b in m.blocks:
                b.ls1.gamma.uniform_(0.5, 1.5)
                b.ls2.gamma.uniform_(0.5, 1.5)
    return m


def dinov2_layout(model) -> dict:
    """timm's state dict back in the encoder's own (DINOv2) names: what UNIC's `encoder.` holds."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    out = {}
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
        slot = torch.randn(1, 1, sd["pos_embed"].shape[-1]) * 0.1  # the class-token slot timm folds away
        out["cls_token"] = sd.pop("cls_token") - slot
        out["pos_embed"] = torch.cat([slot, sd.pop("pos_embed")], dim=1)
    out["mask_token"] = torch.zeros(1, sd["patch_embed.proj.weight"].shape[0])
    for k, v in sd.items():
        out[k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k] = v  # one block chunk
    return out


def unic_file(path, enc: dict, args) -> str:
    model = {f"module.encoder.{k}": v for k, v in enc.items()}
    model["module.lp.heads.dino.cls.1.layers.0.weight"] = torch.zeros(8, 384)  # the projector ladder
    model["module.lp.heads.dino.patch.1.layers.2.bias"] = torch.zeros(8)
    torch.save({"model": model, "args": args, "epoch": 100}, path)
    return str(path)


def dinov2_cls(model, enc: dict, x: torch.Tensor) -> torch.Tensor:
    """The encoder's x_norm_clstoken computed from the DINOv2-layout tensors, DINOv2's way."""
    t = model.patch_embed(x)  # (b, h, w, c)
    b, h, w, c = t.shape
    pe = enc["pos_embed"]
    m = int((pe.shape[1] - 1) ** 0.5)
    patch_pe = pe[:, 1:]
    if (h, w) != (m, m):
        g = patch_pe.reshape(1, m, m, c).permute(0, 3, 1, 2)
        g = F.interpolate(g, scale_factor=((h + 0.1) / m, (w + 0.1) / m), mode="bicubic", antialias=False)
        patch_pe = g.permute(0, 2, 3, 1).reshape(1, h * w, c)
    tokens = torch.cat([enc["cls_token"].expand(b, -1, -1), t.reshape(b, h * w, c)], 1)
    tokens = tokens + torch.cat([pe[:, :1], patch_pe], 1)
    if "register_tokens" in enc:
        tokens = torch.cat([tokens[:, :1], enc["register_tokens"].expand(b, -1, -1), tokens[:, 1:]], 1)
    return F.normalize(model.norm(model.blocks(tokens))[:, 0], dim=-1)


@pytest.mark.parametrize("reg", [False, True])
def test_unic_release_checkpoint_reproduces_the_encoder(tmp_path, reg):
    src = tiny_encoder(reg, seed=1 + reg)
    enc = dinov2_layout(src)
    args = {"arch": "vit_small", "patch_size": 14, "image_size": 56, "drop_path_rate": 0.1}
    if reg:  # the training Namespace, numpy schedules included (as main_unic.py saves it)
        args = argparse.Namespace(**args, lr_schedule=np.linspace(0, 1, 5), teachers=["dino_vitbase_16"])
    path = unic_file(tmp_path / "unic_l.pth", enc, args)
    c = cfg("unc", "unic_l", checkpoint=path)
    assert check("unc", "unic_l", pooling="head", checkpoint=path, pretrained=False).patch == 14
    emb = embedder(c)
    assert emb.bb.patch == 14 and emb.bb.mean == IMAGENET_MEAN and emb.bb.std == IMAGENET_STD
    with torch.no_grad():
        # native 56 px: the position table is used as is, so timm's own forward is the reference
        square = torch.randint(0, 256, (2, 56, 56, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        want = F.normalize(src.forward_features(normed(square, IMAGENET_MEAN, IMAGENET_STD))[:, 0], dim=-1)
        torch.testing.assert_close(emb.embed_pixels(square), want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            dinov2_cls(src, enc, normed(square, IMAGENET_MEAN, IMAGENET_STD)), want, rtol=1e-4, atol=1e-5
        )
        # 75x101 -> 84x112 (6x8 patches): DINOv2's resize of the position table, not timm's
        x = pad_to_multiple(normed(PIXELS, IMAGENET_MEAN, IMAGENET_STD), 14)
        assert x.shape[-2:] == (84, 112)
        got = emb.embed_pixels(PIXELS)
        torch.testing.assert_close(got, dinov2_cls(src, enc, x), rtol=1e-4, atol=1e-5)
        timm_way = F.normalize(src.forward_features(x)[:, 0], dim=-1)
        assert (got - timm_way).abs().max() > 1e-5  # the two resizes differ; we follow the encoder's code


def test_unic_errors_name_the_file(tmp_path, monkeypatch):
    unc = framework("unc")
    assert unc.names() == ("unic_l",)
    assert unc.spec("unic_l").poolings == ("head",) and not unc.spec("unic_l").weights.public
    with pytest.raises(UserError, match="nearest: unic_l"):
        check("unc", "unic_b", pooling="head", pretrained=False)
    with pytest.raises(UserError, match="not supported"):
        check("unc", "unic_l", pooling="gap", pretrained=False)
    with pytest.raises(UserError, match="no public weights.*unic_l.pth"):
        check("unc", "unic_l", pooling="head", pretrained=True)
    with pytest.raises(UserError, match="unic_l.pth"):
        unc.build("unic_l", pretrained=True)

    enc = dinov2_layout(tiny_encoder(False, seed=3))
    args = {"arch": "vit_small", "patch_size": 14, "image_size": 56}
    broken = dict(enc)
    del broken["blocks.0.1.attn.qkv.weight"]
    path = unic_file(tmp_path / "missing.pth", broken, args)
    with pytest.raises(UserError, match=f"{path} does not fit"):
        unc.build("unic_l", checkpoint=path, pretrained=False)
    path = unic_file(tmp_path / "wide.pth", enc, dict(args, arch="vit_base"))  # 384-wide weights, ViT-B args
    with pytest.raises(UserError, match=f"{path} does not fit"):
        unc.build("unic_l", checkpoint=path, pretrained=False)
    path = unic_file(tmp_path / "odd.pth", enc, dict(args, arch="vit_huge"))
    with pytest.raises(UserError, match=f"{path}.*vit_huge"):
        unc.build("unic_l", checkpoint=path, pretrained=False)
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=f"{tmp_path / 'other.pth'} does not hold a UNIC encoder"):
        unc.build("unic_l", checkpoint=str(tmp_path / "other.pth"), pretrained=False)

    torch.save({"model": {}, "args": fractions.Fraction(1, 3)}, tmp_path / "pickled.pth")  # weights_only refuses it
    with pytest.raises(UserError, match="cannot be read safely.*Fraction"):
        unc.build("unic_l", checkpoint=str(tmp_path / "pickled.pth"), pretrained=False)

    # Random weights (pretrained=False) are seeded; a small stand-in for the ViT-L keeps this fast.
    monkeypatch.setitem(unc.MODELS, "unic_l", ("vit_small", 14, 56))
    a, b = (embedder(cfg("unc", "unic_l")).embed_pixels(PIXELS) for _ in range(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (2, 384)


def tiny_hf(kind: str, seed: int):
    import transformers

    torch.manual_seed(seed)
    text = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=99,
        max_position_embeddings=16,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=16
    )
    if kind == "siglip":
        return transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)).eval()
    return transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ).eval()


def image_features(model, x, **kw):
    out = model.get_image_features(pixel_values=x, **kw)
    return out.pooler_output if hasattr(out, "pooler_output") else out


@pytest.mark.parametrize(
    "kind,name,prefix,dim",
    [("siglip", "google/siglip-base-patch16-224", 0, 32), ("clip", "openai/clip-vit-base-patch16", 1, 24)],
)
def test_hf_checkpoint_dir_reproduces_get_image_features(tmp_path, kind, name, prefix, dim):
    model = tiny_hf(kind, seed=7)
    model.save_pretrained(tmp_path / kind)
    c = cfg("hf", name, checkpoint=str(tmp_path / kind))
    assert check("hf", name, pooling="head", checkpoint=str(tmp_path / kind), pretrained=False).poolings == ("head",)
    emb = embedder(c)
    assert emb.bb.mean == emb.bb.std == (0.5, 0.5, 0.5) and emb.bb.patch == 16
    assert emb.bb.model.prefix == prefix
    with torch.no_grad():
        # native 32 px: nothing is resampled, so the model's own image embedding is the reference
        square = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
        want = F.normalize(image_features(model, normed(square, (0.5,) * 3, (0.5,) * 3)), dim=-1)
        got = emb.embed_pixels(square)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got.shape == (3, dim) and not torch.allclose(got[0], got[1])

        # 75x101 -> 80x112: a 5x7 grid, the position table resampled (timm) to 35 (+ class) entries
        seen = []
        tower = emb.bb.model
        hook = next(m for m in tower.modules() if hasattr(m, "position_embedding")).register_forward_hook(
            lambda mod, inp, out: seen.append(out)
        )
        f = emb.embed_pixels(PIXELS)
        hook.remove()
        assert len(seen) == 1 and seen[0].shape == (2, 5 * 7 + prefix, 32)
        e = model.vision_model.embeddings
        x = pad_to_multiple(normed(PIXELS, (0.5,) * 3, (0.5,) * 3), 16)
        tokens = e.patch_embedding(x).flatten(2).transpose(1, 2)
        if prefix:
            tokens = torch.cat([e.class_embedding.expand(2, 1, -1), tokens], dim=1)
        table = resample_abs_pos_embed(e.position_embedding.weight[None], new_size=(5, 7), num_prefix_tokens=prefix)
        torch.testing.assert_close(seen[0], tokens + table, rtol=1e-5, atol=1e-6)
        # transformers' own interpolate_pos_encoding resizes differently (no antialias): not what ILIAS does
        hf_way = F.normalize(image_features(model, x, interpolate_pos_encoding=True), dim=-1)
        assert (f - hf_way).abs().max() > 1e-5
        assert tower.pos_embed_shape(80, 112) == (1, 5 * 7 + prefix, 32)
        assert f.shape == (2, dim) and torch.isfinite(f).all()
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-5)

    # The weights file itself (beside its config.json) loads too; and the text tower is not kept.
    same = embedder(cfg("hf", name, checkpoint=str(tmp_path / kind / "model.safetensors")))
    torch.testing.assert_close(same.embed_pixels(PIXELS), f, rtol=1e-5, atol=1e-6)
    assert not any("text" in k for k in emb.bb.model.state_dict())


def test_hf_names_and_errors(tmp_path, monkeypatch):
    hf = framework("hf")
    assert "google/siglip-so400m-patch14-384" in hf.names() and "openai/clip-vit-large-patch14" in hf.names()
    assert hf.spec("google/siglip-so400m-patch14-384").patch == 14
    assert hf.spec("someone/any-model").weights.source == "hf-hub:someone/any-model"
    with pytest.raises(UserError, match="nearest: google/siglip-base-patch16-224"):
        check("hf", "siglip-base-patch16-224", pooling="head", pretrained=False)
    with pytest.raises(UserError, match="not supported"):
        check("hf", "openai/clip-vit-base-patch16", pooling="gem", pretrained=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local cache"):
        check("hf", "nobody/not-cached-model", pooling="head", pretrained=True)
    with pytest.raises(UserError, match="--checkpoint DIR or hub access"):
        hf.build("nobody/not-cached-model", pretrained=False)
    with pytest.raises(UserError, match="no config.json"):
        hf.build("openai/clip-vit-base-patch16", checkpoint=str(tmp_path), pretrained=False)
    (tmp_path / "w.safetensors").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="directory written by save_pretrained"):
        hf.build("openai/clip-vit-base-patch16", checkpoint=str(tmp_path / "w.safetensors"), pretrained=False)
    # A model whose code lives in the hub repo is refused, never run.
    (tmp_path / "sub" / "config.json").write_text(
        json.dumps({"model_type": "not_in_transformers", "auto_map": {"AutoModel": "modeling_x.XModel"}})
    )
    with pytest.raises(UserError, match="cannot read the model config"):
        hf.build("openai/clip-vit-base-patch16", checkpoint=str(tmp_path / "sub"), pretrained=False)
    src = open(hf.__file__).read()
    assert "trust_remote_code=True" not in src


def test_hf_hub_cache_offline(tmp_path):
    """pretrained=True reads the hub cache (HF_HUB_OFFLINE=1): weights and random init agree on shapes."""
    model = tiny_hf("siglip", seed=11)
    snap = tmp_path / "hub" / "models--google--siglip-base-patch16-224" / "snapshots" / ("a" * 40)
    model.save_pretrained(snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    code = f"""
import dataclasses, torch, torch.nn.functional as F, transformers, ilias_ray.models.registry as M
from ilias_ray.config import Config
from ilias_ray.stages.embed import Embedder
from ilias_ray.job.stage_args import embedder_args
embedder = lambda s: Embedder(**embedder_args(Config(**s)))
M.FRAMEWORKS["hf"] = "ilias_ray.models.hf"
c = dict(dataclasses.asdict(Config(dataset_dir=".", hdf5_dir=".")), framework="hf", pooling="head",
         model="google/siglip-base-patch16-224", pretrained=True)
assert M.check("hf", c["model"], pooling="head", pretrained=True).weights.cached is True
x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
ref = transformers.SiglipModel.from_pretrained({str(snap)!r}).eval()
with torch.no_grad():
    want = ref.get_image_features(pixel_values=x.permute(0, 3, 1, 2).float() / 127.5 - 1)
    want = F.normalize(getattr(want, "pooler_output", want), dim=-1)
torch.testing.assert_close(embedder(c).embed_pixels(x), want, rtol=1e-4, atol=1e-5)
a = embedder(dict(c, pretrained=False)).embed_pixels(x)  # the cached config, seeded random weights
b = embedder(dict(c, pretrained=False)).embed_pixels(x)
assert torch.equal(a, b) and not torch.allclose(a, want)
print("ok")
"""
    env = dict(os.environ, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    p = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
