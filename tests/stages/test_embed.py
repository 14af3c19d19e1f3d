"""ilias_ray.embed (spec 4 padding, 5, 6) checked against independent computations: numpy
padding, torchvision ops and the timm model object used directly (see tests/reference.py for
the ground rules).

Blocks, as numbered in the former tests/test_math.py:
- 2. padding (spec 4 CenterPadding, spec 5 ViT patch padding): center_pad and pad_to_multiple.
- 5. the model stage (spec 5, 6): the Embedder against the reference pipeline for ViTs and
  CNNs, every pooling, TTA (multiscale, multirotate), masking after the centred padding, local
  pooling, the Ray batch callable grouping shapes and masks, and CPU chunks leaving features
  unchanged. (The timm name rules of the same block are in test_model_timm.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import stage_settings as stages
from ilias_ray.stages import embed
from ilias_ray.stages.rows import object_column as objects
from reference import CNN, IMAGENET_MEAN, IMAGENET_STD, VIT, embedder, make_cfg, rng_pixels

TOL = dict(rtol=1e-5, atol=1e-5)


def np_center_pad(a, th, tw):
    """Zero-pad the last two axes of `a` to at least (th, tw); left/top = pad // 2."""
    h, w = a.shape[-2:]
    H, W = max(h, th), max(w, tw)
    out = np.zeros(a.shape[:-2] + (H, W), dtype=a.dtype)
    top, left = (H - h) // 2, (W - w) // 2
    out[..., top : top + h, left : left + w] = a
    return out


def t_center_pad(x, th, tw):
    return torch.from_numpy(np_center_pad(x.numpy(), th, tw))


def t_pad_multiple(x, m):
    h, w = x.shape[-2:]
    return t_center_pad(x, int(math.ceil(h / m)) * m, int(math.ceil(w / m)) * m)


def ref_pool(name, ff, token):
    """Pooling of forward_features output, written from spec 5 (float32)."""
    ff = ff.float()
    if ff.ndim == 3:  # (b, l, d) tokens
        cls = None
        if token:
            cls, ff = ff[:, 0], ff[:, 1:]
        if name == "cls":
            return cls
        pos = ff.transpose(1, 2)  # (b, d, l): positions on the last axis
    else:  # (b, c, h, w)
        pos = ff.reshape(ff.shape[0], ff.shape[1], -1)
    if name == "gap":
        return pos.mean(-1)
    if name == "mac":
        return pos.max(-1).values
    if name == "gem":
        m = torch.minimum(pos.min(-1, keepdim=True).values, torch.zeros(()))
        return ((pos + m).clamp(min=1e-6) ** 3).mean(-1) ** (1.0 / 3) - m[..., 0]
    if name == "local":
        return pos.transpose(1, 2)  # (b, n, d), row-major positions
    raise AssertionError(name)


def ref_embed(
    model, pixels, mean, std, *, pad=0, mask=None, patch=0, pooling="head", token=False, scales=(1.0,), angles=(0,)
):
    """The reference pipeline after the resize, with torchvision ops and the model object."""
    x = torch.stack([TF.normalize(TF.to_tensor(p), list(mean), list(std)) for p in pixels])
    if pad:
        x = t_center_pad(x, pad, pad)
    if mask is not None:
        x = x * torch.as_tensor(mask)[:, None].float()
    views = []
    with torch.no_grad():
        for s in scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
            for a in angles:
                xr = xs if a == 0 else TF.rotate(xs, a, interpolation=InterpolationMode.BILINEAR)
                if patch:
                    xr = t_pad_multiple(xr, patch)
                if pooling == "head":
                    f = model(xr)
                else:
                    f = ref_pool(pooling, model.forward_features(xr), token)
                views.append(F.normalize(f.float(), dim=-1))
    if len(views) == 1:
        return views[0]
    return F.normalize(torch.stack(views).mean(0), dim=-1)


def model_mean_std(model):
    pc = model.pretrained_cfg
    return tuple(pc["mean"]), tuple(pc["std"])


@pytest.mark.parametrize(
    "h,w,th,tw", [(5, 8, 8, 8), (5, 5, 8, 9), (10, 3, 4, 4), (7, 7, 7, 7), (1, 2, 16, 15), (6, 6, 0, 0)]
)
def test_center_pad_matches_numpy(h, w, th, tw):
    a = np.random.default_rng(h * 100 + w).standard_normal((2, 3, h, w)).astype(np.float32)
    got = embed.center_pad(torch.from_numpy(a), th, tw).numpy()
    np.testing.assert_array_equal(got, np_center_pad(a, th, tw))


def test_center_pad_split_explicit():
    x = torch.ones(1, 1, 5, 4)
    y = embed.center_pad(x, 8, 7).numpy()[0, 0]
    assert y.shape == (8, 7)
    # height pad 3: top 1, bottom 2; width pad 3: left 1, right 2
    exp = np.zeros((8, 7), np.float32)
    exp[1:6, 1:5] = 1
    np.testing.assert_array_equal(y, exp)


@pytest.mark.parametrize("m", [14, 16])
@pytest.mark.parametrize("h,w", [(17, 17), (16, 14), (1, 1), (29, 30), (32, 28), (15, 13)])
def test_pad_to_multiple(m, h, w):
    a = np.random.default_rng(h * w + m).standard_normal((1, 3, h, w)).astype(np.float32)
    got = embed.pad_to_multiple(torch.from_numpy(a), m).numpy()
    H, W = -(-h // m) * m, -(-w // m) * m
    assert got.shape[-2:] == (H, W)
    assert H % m == 0 and W % m == 0
    np.testing.assert_array_equal(got, np_center_pad(a, H, W))


def test_pad_to_multiple_zero_is_noop():
    x = torch.randn(2, 3, 17, 5)
    y = embed.pad_to_multiple(x, 0)
    assert y.shape == x.shape
    assert torch.equal(y, x)


def test_pad_to_multiple_explicit_split():
    # 17 -> 32 with m=16: pad 15, top 7, bottom 8
    y = embed.pad_to_multiple(torch.ones(1, 1, 17, 16), 16).numpy()[0, 0]
    assert y.shape == (32, 16)
    assert y[:7].sum() == 0 and y[24:].sum() == 0 and (y[7:24] == 1).all()


VIT_CASES = [
    # (pooling, transforms, min_size, H, W)
    ("head", "RESIZE_LARGE", 0, 37, 53),
    ("cls", "RESIZE_LARGE", 0, 50, 29),
    ("gap", "RESIZE_LARGE", 0, 37, 53),
    ("gem", "RESIZE_LARGE", 0, 21, 64),
    ("head", "RESIZE_LARGE", 40, 30, 45),  # min_size pad to (40, 45), then patch pad to (48, 48)
    ("head", "RESIZE_PAD", 0, 40, 57),  # RESIZE_PAD pads to resolution (64)
]


@pytest.mark.parametrize("pooling,transforms,min_size,H,W", VIT_CASES)
def test_vit_embed_matches_reference(pooling, transforms, min_size, H, W):
    emb = embedder(model=VIT, pooling=pooling, transforms=transforms, resolution=64, min_size=min_size)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(H * W, 2, H, W, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    pad = {"RESIZE_LARGE": min_size, "RESIZE_PAD": 64}[transforms]
    exp = ref_embed(model, pixels, mean, std, pad=pad, patch=16, pooling=pooling, token=True)
    assert got.shape == (2, model.embed_dim)
    torch.testing.assert_close(got, exp, **TOL)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2), **TOL)


def test_vit_padding_is_centred_not_one_sided():
    """Sanity: the reference comparison is sensitive to where the zero padding goes."""
    emb = embedder(model=VIT, pooling="head", resolution=64)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(7, 1, 37, 53, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    x = TF.normalize(TF.to_tensor(pixels[0]), list(mean), list(std))[None]
    with torch.no_grad():
        one_sided = F.normalize(model(F.pad(x, (0, 11, 0, 11))), dim=-1)  # right/bottom only
    assert not torch.allclose(got, one_sided, atol=1e-4)


def test_cnn_gem_and_gap():
    for pooling in ("gem", "gap", "mac", "head"):
        emb = embedder(model=CNN, pooling=pooling, resolution=64)
        model = emb.bb.model
        mean, std = model_mean_std(model)
        assert (mean, std) == (IMAGENET_MEAN, IMAGENET_STD)
        pixels = rng_pixels(11, 2, 45, 61, 3)
        got = emb.embed_pixels(torch.from_numpy(pixels))
        exp = ref_embed(model, pixels, mean, std, pooling=pooling)
        assert got.shape == (2, 512)
        torch.testing.assert_close(got, exp, **TOL)


def test_vit_tta_multiscale_multirotate():
    emb = embedder(model=VIT, pooling="head", resolution=64, multiscale=True, multirotate=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(21, 1, 30, 46, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    exp = ref_embed(
        model,
        pixels,
        mean,
        std,
        patch=16,
        pooling="head",
        token=True,
        scales=(0.707, 1.0, 1.414),
        angles=(0, 90, 180, 270),
    )
    torch.testing.assert_close(got, exp, **TOL)
    # and it is not just the single view
    single = ref_embed(model, pixels, mean, std, patch=16, pooling="head", token=True)
    assert not torch.allclose(got, single, atol=1e-4)


def test_cnn_gem_multiscale_with_mask_and_pad():
    emb = embedder(model=CNN, pooling="gem", transforms="RESIZE_PAD", resolution=48, multiscale=True, masking=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(31, 2, 33, 48, 3)
    mask = rng_pixels(32, 2, 48, 48) % 2
    got = emb.embed_pixels(torch.from_numpy(pixels), torch.from_numpy(mask))
    exp = ref_embed(model, pixels, mean, std, pad=48, mask=mask, pooling="gem", scales=(0.707, 1.0, 1.414))
    torch.testing.assert_close(got, exp, **TOL)


def test_cnn_multirotate_gem():
    emb = embedder(model=CNN, pooling="gem", resolution=64, multirotate=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(41, 1, 40, 52, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    exp = ref_embed(model, pixels, mean, std, pooling="gem", angles=(0, 90, 180, 270))
    torch.testing.assert_close(got, exp, **TOL)


def test_vit_mask_after_center_padding():
    emb = embedder(model=VIT, pooling="gap", transforms="RESIZE_PAD", resolution=64, masking=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(51, 1, 40, 57, 3)
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 10:50, 5:40] = 1
    got = emb.embed_pixels(torch.from_numpy(pixels), torch.from_numpy(mask))
    exp = ref_embed(model, pixels, mean, std, pad=64, mask=mask, patch=16, pooling="gap", token=True)
    torch.testing.assert_close(got, exp, **TOL)


def test_local_pooling_vit_and_cnn():
    emb = embedder(model=VIT, pooling="local", resolution=64)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(61, 2, 37, 53, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    n = (48 // 16) * (64 // 16)  # padded to 48 x 64
    assert got.shape == (2, n, model.embed_dim)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2, n), **TOL)
    exp = ref_embed(model, pixels, mean, std, patch=16, pooling="local", token=True)
    torch.testing.assert_close(got, exp, **TOL)

    emb = embedder(model=CNN, pooling="local", resolution=64)
    pixels = rng_pixels(62, 1, 64, 96, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    assert got.shape == (1, 2 * 3, 512)  # resnet18: stride 32
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(1, 6), **TOL)
    exp = ref_embed(emb.bb.model, pixels, IMAGENET_MEAN, IMAGENET_STD, pooling="local")
    torch.testing.assert_close(got, exp, **TOL)


def test_mobilenet_head_no_padding():
    emb = embedder(model="mobilenetv3_small_050", pooling="head", resolution=64)
    model = emb.bb.model
    assert emb.bb.patch == 0 and model.num_classes == 0
    mean, std = model_mean_std(model)
    pixels = rng_pixels(71, 2, 35, 50, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    exp = ref_embed(model, pixels, mean, std, pooling="head")
    torch.testing.assert_close(got, exp, **TOL)


def test_embedder_call_groups_shapes_and_masks():
    """The Ray batch callable: rows of different shapes (and masks) embed as if alone."""
    from ilias_ray.stages.rows import State
    from ilias_ray.testing.batches import routed

    emb = stages.embedder(
        make_cfg(
            model=CNN,
            pooling="gem",
            transforms="RESIZE_LARGE",
            resolution=64,
            min_size=40,
            masking=True,
            store_fp16=True,
        )
    )
    model = emb.bb.model
    shapes = [(33, 47), (50, 30), (33, 47), None, (33, 47)]
    masks = [True, False, False, None, True]
    rows = {k: [] for k in ("img", "mask", "state")}
    exp = []
    for i, (shape, has_mask) in enumerate(zip(shapes, masks)):
        if shape is None:
            rows["img"].append(np.zeros((0, 0, 3), np.uint8))
            rows["mask"].append(np.zeros((0, 0), np.uint8)), rows["state"].append(State.SKIPPED)
            exp.append(None)
            continue
        h, w = shape
        px = rng_pixels(80 + i, 1, h, w, 3)
        th, tw = max(h, 40), max(w, 40)
        m = (rng_pixels(90 + i, 1, th, tw) % 2) if has_mask else None
        rows["img"].append(px[0])
        rows["mask"].append(m[0] if has_mask else np.zeros((0, 0), np.uint8)), rows["state"].append(State.PIXELS)
        exp.append(ref_embed(model, px, IMAGENET_MEAN, IMAGENET_STD, pad=40, mask=m, pooling="gem")[0])
    n = len(shapes)
    batch = routed(
        n,
        state=np.array(rows["state"], np.int8),
        data=objects([b""] * n),
        img=objects(rows["img"]),
        mask=objects(rows["mask"]),
    )
    out = emb(batch)
    for i in range(n):
        if exp[i] is None:
            assert out["feat"][i].shape == (0, 0) and out["state"][i] == State.SKIPPED
            continue
        assert out["feat"][i].shape == (1, exp[i].shape[-1]) and out["state"][i] == State.FEATURES
        f = out["feat"][i][0]
        np.testing.assert_allclose(
            f.astype(np.float32), exp[i].numpy().astype(np.float16).astype(np.float32), rtol=0, atol=1e-3
        )


def test_cpu_chunks_do_not_change_features():
    """On a CPU a batch runs in small forward passes (cache-sized); the features must not change."""
    emb = stages.embedder(
        make_cfg(model=CNN, pooling="gem", transforms="RESIZE_LARGE", resolution=64, min_size=40, multiscale=True)
    )
    px = torch.from_numpy(rng_pixels(7, 5, 33, 47, 3))
    mask = torch.from_numpy(rng_pixels(8, 5, 40, 47) % 2)
    assert emb.chunk((33, 47)) >= 5  # small images: the whole batch in one pass
    whole = emb.embed_pixels(px, mask)
    emb.chunk_pixels = 1  # one image per pass
    assert emb.chunk((33, 47)) == 1
    torch.testing.assert_close(emb.embed_pixels(px, mask), whole, **TOL)
