"""`--framework unicom`: names, every pooling, an independent recomputation of the head, checkpoints, sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

import ilias_ray.config
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.models import unicom
from ilias_ray.models.base import OPENAI_MEAN, OPENAI_STD
from ilias_ray.models.registry import check
from stage_settings import embedder

BASE = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))


PIXELS = torch.randint(0, 256, (2, 75, 101, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


POOLINGS = ("head", "gap", "mac", "gem", "rmac", "rgem", "local")


NAMES = (
    "unicom_vit_base_patch16_224",
    "unicom_vit_large_patch14_224",
    "unicom_vit_large_patch14_336",
    "unicom_vit_base_patch16_sop",
    "unicom_vit_base_patch16_gldv2",
    "unicom_vit_base_patch32_224",
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ilias_ray.config.FRAMEWORKS, "unicom", "ilias_ray.models.unicom")


def cfg(model, **kw):
    return dict(BASE, framework="unicom", model=model, pretrained=False, **kw)


def test_specs(registered, tmp_path, monkeypatch):
    monkeypatch.setenv("UNICOM_HOME", str(tmp_path))
    assert set(unicom.names()) == set(NAMES)
    for name in NAMES:
        s = unicom.spec(name)
        assert s.mean == OPENAI_MEAN and s.std == OPENAI_STD
        assert s.patch == (14 if "patch14" in name else 16)
        assert "cls" not in s.poolings and set(s.poolings) == set(POOLINGS)
        public = not name.endswith(("_sop", "_gldv2"))
        assert s.weights.public == public
        if public:
            assert s.weights.source.startswith("https://github.com/deepglint/unicom/releases/download/")
            assert s.weights.cached is False and str(tmp_path) in s.weights.hint
        else:
            assert s.weights.hint.startswith("ViT_B_16_") and s.weights.hint.endswith(".pt")
            with pytest.raises(UserError, match="no public weights"):
                check("unicom", name, pooling="head", pretrained=True)
    with pytest.raises(UserError, match="nearest: unicom_vit_base_patch16_224"):
        unicom.spec("unicom_vit_base_patch16_22")
    with pytest.raises(UserError, match="not supported"):
        check("unicom", "unicom_vit_base_patch16_224", pooling="cls", pretrained=False)
    check("unicom", "unicom_vit_base_patch16_sop", pooling="head", checkpoint="x.pt", pretrained=False)
    # The cache flag follows the file.
    (tmp_path / "FP16-ViT-B-16.pt").write_bytes(b"x")
    assert unicom.spec("unicom_vit_base_patch16_224").weights.cached is True
    with pytest.raises(UserError, match="no public weights"):
        unicom.build("unicom_vit_base_patch16_sop", pretrained=True)


@pytest.mark.parametrize("name", ["unicom_vit_base_patch16_224", "unicom_vit_base_patch16_gldv2"])
def test_embeds_every_pooling(registered, name):
    emb = embedder(cfg(name, pooling="head"))
    m = emb.bb.model
    side = 512 // 16 if name.endswith("gldv2") else 224 // 16
    assert m.pos_embed.shape == (1, side * side, 768)
    assert m.feature[0].weight.shape == (768, 768 * side * side)
    for p in POOLINGS:
        emb.pooling = p
        # check() asks for --checkpoint whenever a model has no public weights, even with --pretrained false.
        check(
            "unicom",
            name,
            pooling=p,
            checkpoint=None if name.endswith("_224") else "ViT_B_16_GLDv2.pt",
            pretrained=False,
        )
        f = emb.embed_pixels(PIXELS)
        assert torch.isfinite(f).all(), p
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(f.shape[:-1]), rtol=0, atol=1e-4)
        if p == "local":
            assert f.shape == (2, math.ceil(75 / 16) * math.ceil(101 / 16), 768)
        else:
            assert f.shape == (2, 768), p


def reference_tokens(sd, x, patch, side, heads, depth):
    """UNICOM's normed tokens recomputed from the state dict with plain tensor ops (no nn modules, no SDPA)."""
    y = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    b, d, h, w = y.shape
    t = y.reshape(b, d, h * w).permute(0, 2, 1)
    pos = sd["pos_embed"].reshape(1, side, side, d).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
    t = t + pos.reshape(1, d, h * w).permute(0, 2, 1)

    def ln(z, pre):
        mu = z.mean(-1, keepdim=True)
        var = ((z - mu) ** 2).mean(-1, keepdim=True)
        return (z - mu) / torch.sqrt(var + 1e-5) * sd[pre + ".weight"] + sd[pre + ".bias"]

    hd = d // heads
    for i in range(depth):
        p = f"blocks.{i}."
        z = ln(t, p + "norm1")
        qkv = (z @ sd[p + "attn.qkv.weight"].T).reshape(b, h * w, 3, heads, hd)
        q, k, v = (qkv[:, :, j].transpose(1, 2) for j in range(3))  # (b, heads, L, hd)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, h * w, d)
        t = t + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        z = ln(t, p + "norm2")
        z = torch.clamp(z @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"], 0, 6)
        t = t + z @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    return ln(t, "norm"), (h, w)


def reference_head(sd, t, h, w, side):
    """The embedding layer on the normed tokens t (b, h*w, d): adaptive pool to side x side, Linear/BN x2."""
    b, d = t.shape[0], t.shape[-1]
    grid = t.reshape(b, h, w, d).permute(0, 3, 1, 2)
    # Adaptive average pooling by hand: output cell i covers [floor(i*H/S), ceil((i+1)*H/S)).
    rows = [(i * h // side, -(-(i + 1) * h // side)) for i in range(side)]
    cols = [(j * w // side, -(-(j + 1) * w // side)) for j in range(side)]
    pooled = torch.stack(
        [torch.stack([grid[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for c0, c1 in cols], -1) for r0, r1 in rows], -2
    )  # (b, d, side, side)
    flat = pooled.reshape(b, d, side * side).permute(0, 2, 1).reshape(b, -1)

    def bn(z, pre):
        return (z - sd[pre + ".running_mean"]) / torch.sqrt(sd[pre + ".running_var"] + 2e-5) * sd[pre + ".weight"] + sd[
            pre + ".bias"
        ]

    z = bn(flat @ sd["feature.0.weight"].T, "feature.1")
    return bn(z @ sd["feature.2.weight"].T, "feature.3")


@pytest.mark.parametrize(
    "name,patch,emb_dim,sizes",
    [
        # the training grid itself (identity resize of pos_embed, identity pooling)
        ("unicom_vit_base_patch32_224", 32, 512, [(224, 224)]),
        # 15x8 grid: pooled down to 14 rows, up to 14 columns
        ("unicom_vit_base_patch16_224", 16, 768, [(240, 128)]),
    ],
)
def test_head_matches_independent_recomputation(name, patch, emb_dim, sizes):
    bb = unicom.build(name, pretrained=False)
    m = bb.model
    assert not m.training and bb.patch == 16 and bb.token_pool is False
    g = torch.Generator().manual_seed(1)
    # Non-trivial BatchNorm statistics, so the recomputation checks their use too.
    with torch.no_grad():
        for bn in (m.feature[1], m.feature[3]):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.01)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
    sd = {k: v.detach() for k, v in m.state_dict().items()}
    for hw in sizes:
        x = torch.randn(2, 3, *hw, generator=g)
        with torch.no_grad():
            got, t = bb.head(x), bb.features(x)
            want_t, (h, w) = reference_tokens(sd, x, patch, 224 // patch, 12, 12)
            want = reference_head(sd, want_t, h, w, 224 // patch)
        assert got.shape == (2, emb_dim)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        # The other poolings read the normed tokens, row-major over the grid.
        assert t.shape == (2, (hw[0] // patch) * (hw[1] // patch), 768) and h * w == t.shape[1]
        torch.testing.assert_close(t, want_t, rtol=1e-4, atol=1e-4)


def test_fp16_checkpoint_with_prefixes(registered, tmp_path):
    name = "unicom_vit_base_patch32_224"
    random = embedder(cfg(name, pooling="head"))
    sd = random.bb.model.state_dict()
    # The released-file situation: fp16 values, torch.compile's `_orig_mod.` prefix (here under DDP's
    # `module.`), and no BatchNorm step counters.
    path = tmp_path / "ViT_B_32_finetune.pt"
    torch.save(
        {
            "state_dict": {
                f"module._orig_mod.{k}": (v.half() if v.is_floating_point() else v)
                for k, v in sd.items()
                if "num_batches_tracked" not in k
            }
        },
        path,
    )
    loaded = embedder(cfg(name, pooling="head", checkpoint=str(path)))
    for pooling in ("head", "gem"):
        random.pooling = loaded.pooling = pooling
        a, b = random.embed_pixels(PIXELS), loaded.embed_pixels(PIXELS)
        assert not torch.equal(a, b)  # the weights really were rounded and reloaded
        torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    got = loaded.bb.model.state_dict()
    for k, v in sd.items():
        if v.is_floating_point():
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k], v.half().float(), rtol=0, atol=0)
    # Missing keys: a clean error naming the file.
    broken = tmp_path / "broken.pt"
    torch.save({f"_orig_mod.{k}": v for k, v in sd.items() if k.startswith(("patch_embed.", "pos_embed"))}, broken)
    with pytest.raises(UserError, match=r"broken\.pt does not fit the model: \d+ missing key\(s\) \(e\.g\. blocks\.0"):
        unicom.build(name, checkpoint=str(broken), pretrained=False)


def test_sha256_is_verified_without_network(tmp_path, monkeypatch):
    name = "unicom_vit_base_patch32_224"
    monkeypatch.setenv("UNICOM_HOME", str(tmp_path / "cache"))
    downloads = []

    def fake_download(url, dst, *a, **kw):
        downloads.append(url)
        with open(dst, "wb") as f:
            f.write(b"not the weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    # A corrupt file already in the cache is rejected before anything is downloaded.
    (tmp_path / "cache").mkdir()
    bad = tmp_path / "cache" / "FP16-ViT-B-32.pt"
    bad.write_bytes(b"truncated")
    assert unicom.spec(name).weights.cached is True
    with pytest.raises(UserError, match="sha256 mismatch.*delete it and retry"):
        unicom.build(name, pretrained=True)
    assert downloads == []
    # A download whose hash does not match is not kept under the final name (nor as a partial file).
    bad.unlink()
    with pytest.raises(UserError, match="sha256 mismatch"):
        unicom.build(name, pretrained=True)
    assert downloads == ["https://github.com/deepglint/unicom/releases/download/b32/FP16-ViT-B-32.pt"]
    assert list((tmp_path / "cache").iterdir()) == []
    # A file whose hash matches is used: pretend the release is this fp16 state dict (of a one-block
    # variant, to keep the test fast).
    monkeypatch.setitem(unicom.MODELS, name, dataclasses.replace(unicom.MODELS[name], depth=1))
    random = unicom.build(name, pretrained=False).model.state_dict()
    sd = {k: (v.half() if v.is_floating_point() else v) for k, v in random.items()}
    good = tmp_path / "release.pt"
    torch.save(sd, good)
    monkeypatch.setitem(
        unicom.MODELS,
        name,
        dataclasses.replace(unicom.MODELS[name], sha256=hashlib.sha256(good.read_bytes()).hexdigest()),
    )

    def good_download(url, dst, *a, **kw):
        downloads.append(url)
        with open(dst, "wb") as f:
            f.write(good.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", good_download)
    m = unicom.build(name, pretrained=True).model
    assert len(downloads) == 2 and (tmp_path / "cache" / "FP16-ViT-B-32.pt").exists()
    torch.testing.assert_close(m.pos_embed.detach(), sd["pos_embed"].float(), rtol=0, atol=0)
    unicom.build(name, pretrained=True)  # now from the verified cache
    assert len(downloads) == 2
