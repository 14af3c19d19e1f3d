"""The spec's math (sections 3-6, 9) checked against independent computations.

Every expected value here is computed in the test itself: hand-written formulas and loops,
or torchvision / PIL / the timm model object used directly, the way the reference uses them.
The code under test is never used to compute its own expected value. CPU only, no Ray, no
network: timm models are built with pretrained=False.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode

from ilias_ray import embed, plan, preprocess
from ilias_ray.config import Config
from ilias_ray.preprocess import object_column as objects
from ilias_ray.models import timm_models
import stages

VIT = "vit_tiny_patch16_224"
CNN = "resnet18"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------ helpers


def rng_pixels(seed, *shape):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def rgb_image(seed, w, h):
    return Image.fromarray(rng_pixels(seed, h, w, 3), "RGB")


def make_cfg(**over):
    cfg = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))
    cfg.update(pretrained=False, comp_fp16=False, store_fp16=False, batch_size=8)
    cfg.update(over)
    return cfg


_EMBEDDERS = {}


def embedder(**over):
    """One Embedder per distinct config (model creation is the slow part)."""
    key = tuple(sorted(over.items()))
    if key not in _EMBEDDERS:
        _EMBEDDERS[key] = stages.embedder(make_cfg(**over))
    return _EMBEDDERS[key]


def ref_large_side(w, h, s):
    """Spec 4: ar = H / W; ar <= 1 -> (s, int(s * ar)) else (int(s / ar), s); each >= 1."""
    ar = h / w
    if ar <= 1:
        nw, nh = s, int(s * ar)
    else:
        nw, nh = int(s / ar), s
    return (nw if nw >= 1 else 1, nh if nh >= 1 else 1)


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


def ref_embed(model, pixels, mean, std, *, pad=0, mask=None, patch=0, pooling="head",
              token=False, scales=(1.0,), angles=(0,)):
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


# ------------------------------------------------------------ 1. resize sizes/pixels

SIZES = [
    (1, 1), (1, 7), (7, 1), (1, 1000), (1000, 1), (2, 3), (3, 2), (640, 480), (480, 640),
    (512, 512), (100, 100), (1000, 333), (333, 1000), (1024, 683), (683, 1024), (4000, 3),
    (3, 4000), (799, 800), (800, 799), (37, 23), (23, 37), (5000, 4999), (12, 7), (7, 12),
]


@pytest.mark.parametrize("s", [1, 7, 64, 224, 384, 512, 724])
def test_large_side_size_matches_spec_formula(s):
    for w, h in SIZES:
        assert preprocess.large_side_size(w, h, s) == ref_large_side(w, h, s), (w, h, s)


def test_large_side_size_literal_cases():
    # hand-computed
    assert preprocess.large_side_size(640, 480, 512) == (512, 384)
    assert preprocess.large_side_size(480, 640, 512) == (384, 512)
    assert preprocess.large_side_size(512, 512, 224) == (224, 224)
    assert preprocess.large_side_size(1000, 333, 512) == (512, 170)  # 170.496
    assert preprocess.large_side_size(3, 1000, 512) == (1, 512)  # int(1.536) = 1
    assert preprocess.large_side_size(1, 1000, 512) == (1, 512)  # int(0.512) = 0 -> 1
    assert preprocess.large_side_size(1000, 1, 512) == (512, 1)
    assert preprocess.large_side_size(10, 20, 7) == (3, 7)  # int(3.5) = 3: truncation, not rounding
    assert preprocess.large_side_size(7, 3, 64) == (64, 27)  # upscaling: int(27.43)


@pytest.mark.parametrize("transforms", ["RESIZE_LARGE", "RESIZE_PAD"])
@pytest.mark.parametrize("w,h", [(37, 23), (23, 37), (50, 50), (1, 9), (9, 1), (7, 3), (300, 120)])
def test_resize_large_is_pillow_bicubic(transforms, w, h):
    img = rgb_image(w * 31 + h, w, h)
    s = 48
    size = ref_large_side(w, h, s)
    out = preprocess.resize(img, transforms, s)
    assert out.size == size
    exp = img.resize(size, Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(exp))


def ref_short_side(w, h, size):
    """torchvision Resize(int): shorter side -> size, longer -> int(size * long / short)."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


@pytest.mark.parametrize("w,h", [(80, 50), (50, 80), (40, 40), (33, 100), (100, 33), (31, 32), (200, 7)])
def test_resize_small_center_square(w, h):
    img = rgb_image(w + 1000 * h, w, h)
    res = 32

    nw, nh = ref_short_side(w, h, res)
    small = preprocess.resize(img, "RESIZE_SMALL", res)
    assert small.size == (nw, nh)
    bil = img.resize((nw, nh), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(np.asarray(small), np.asarray(bil))

    center = preprocess.resize(img, "RESIZE_CENTER", res)
    assert center.size == (res, res)
    top, left = int(round((nh - res) / 2.0)), int(round((nw - res) / 2.0))
    np.testing.assert_array_equal(np.asarray(center), np.asarray(bil)[top : top + res, left : left + res])

    square = preprocess.resize(img, "RESIZE_SQUARE", res)
    assert square.size == (res, res)
    np.testing.assert_array_equal(np.asarray(square), np.asarray(img.resize((res, res), Image.Resampling.BILINEAR)))


def test_resize_small_literal_sizes():
    img = Image.new("RGB", (80, 50))
    assert preprocess.resize(img, "RESIZE_SMALL", 32).size == (51, 32)  # int(32 * 80 / 50) = 51
    assert preprocess.resize(img.transpose(Image.Transpose.TRANSPOSE), "RESIZE_SMALL", 32).size == (32, 51)
    assert preprocess.resize(Image.new("RGB", (33, 100)), "RESIZE_SMALL", 32).size == (32, 96)


def test_pad_target():
    assert preprocess.pad_target("RESIZE_LARGE", 512, 0) == 0
    assert preprocess.pad_target("RESIZE_LARGE", 512, 600) == 600
    assert preprocess.pad_target("RESIZE_PAD", 512, 0) == 512
    for t in ("RESIZE_SMALL", "RESIZE_CENTER", "RESIZE_SQUARE"):
        assert preprocess.pad_target(t, 512, 600) == 0


# ------------------------------------------------------------------ 2. padding


@pytest.mark.parametrize("h,w,th,tw", [(5, 8, 8, 8), (5, 5, 8, 9), (10, 3, 4, 4), (7, 7, 7, 7), (1, 2, 16, 15), (6, 6, 0, 0)])
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


# ------------------------------------------------------------------ 3. escape_id


def ref_escape(p):
    """Independent reading of the spec expression for printable ASCII and non-ASCII chars:
    unicode-escape gives \\xNN (< 0x100), \\uNNNN (BMP), \\UNNNNNNNN (above); str(bytes)
    doubles the backslash; then "\\\\u" -> "#U" and "\\\\x" -> "#U00". The capital-U
    form matches neither replacement, so it stays as two backslashes + U + 8 hex digits."""
    out = []
    for ch in p:
        o = ord(ch)
        assert o >= 0x20 and ch not in "\\'\"" and o != 0x7F  # cases covered here
        if o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append("#U00%02x" % o)
        elif o < 0x10000:
            out.append("#U%04x" % o)
        else:
            out.append("\\\\U%08x" % o)
    return "".join(out)


def test_escape_id_documented_examples():
    assert plan.escape_id("café_000/pos/P000_00.jpg") == "caf#U00e9_000/pos/P000_00.jpg"
    assert plan.escape_id("abc_000/query/Q000_01.jpg") == "abc_000/query/Q000_01.jpg"
    assert plan.escape_id("ж") == "#U0436"
    # non-BMP: the expression leaves "\\U0001f600" (two backslashes, capital U) in place
    assert plan.escape_id("a😀b.jpg") == "a" + "\\" + "\\" + "U0001f600b.jpg"
    assert plan.escape_id("😀") == r"\\U0001f600"


def test_escape_id_ascii_identity():
    import string

    s = "".join(c for c in string.printable if c not in "\\'\"\t\n\r\x0b\x0c")
    assert plan.escape_id(s) == s
    assert plan.escape_id("00042.tar/1000123") == "00042.tar/1000123"


@pytest.mark.parametrize(
    "p",
    ["café_000/pos/P000_00.jpg", "Ünïcödé/ж/中文/P1.jpg", "naïve ßtraße ÿ€.png", "x😀y/🎉.jpg", "ɐ_ā_Ω_ﬁ"],
)
def test_escape_id_matches_independent(p):
    got = plan.escape_id(p)
    assert got == ref_escape(p)
    assert got.isascii()


# ------------------------------------------------------------------ 4. boxes


def test_box_union_clip():
    boxes = [[-5, 3, 10, 20], [50, -7, 20000, 4], [10, 10, 5, 5]]
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    exp = tuple(min(max(v, 0), 10000) for v in (x0, y0, x1, y1))
    assert exp == (0, 0, 10000, 23)
    assert tuple(preprocess.box_union(boxes)) == exp
    assert tuple(preprocess.box_union([[3, 4, 5, 6]])) == (3, 4, 8, 10)
    assert tuple(preprocess.box_union([[20000, 20000, 5, 5]])) == (10000, 10000, 10000, 10000)


def ref_box_mask(w, h, boxes):
    m = np.zeros((h, w), np.uint8)
    for r in range(h):
        for c in range(w):
            for x, y, bw, bh in boxes:
                if x <= c < x + bw and y <= r < y + bh:
                    m[r, c] = 1
    return m


@pytest.mark.parametrize(
    "w,h,boxes",
    [
        (37, 23, [[3, 4, 10, 6]]),
        (37, 23, [[3, 4, 10, 6], [20, 10, 30, 30]]),
        (20, 30, [[-5, -2, 8, 9]]),
        (20, 30, [[0, 0, 20, 30]]),
        (20, 30, [[25, 35, 4, 4]]),
        (16, 16, [[2, 2, 0, 5], [1, 1, 1, 1]]),
    ],
)
def test_box_mask(w, h, boxes):
    np.testing.assert_array_equal(preprocess.box_mask(w, h, boxes), ref_box_mask(w, h, boxes))


def ref_nearest(mask, oh, ow):
    """torch legacy 'nearest': src = min(floor(dst * (in / out)), in - 1), float32 math."""
    ih, iw = mask.shape
    sh, sw = np.float32(ih) / np.float32(oh), np.float32(iw) / np.float32(ow)
    out = np.zeros((oh, ow), mask.dtype)
    for r in range(oh):
        sr = min(int(np.floor(np.float32(r) * sh)), ih - 1)
        for c in range(ow):
            sc = min(int(np.floor(np.float32(c) * sw)), iw - 1)
            out[r, c] = mask[sr, sc]
    return out


@pytest.mark.parametrize(
    "ih,iw,oh,ow",
    [(23, 37, 23, 37), (23, 37, 46, 74), (23, 37, 64, 64), (100, 333, 30, 100), (3, 7, 7, 3),
     (1, 1, 5, 5), (50, 60, 1, 1), (97, 41, 224, 96), (333, 1000, 170, 512)],
)
def test_resize_mask_nearest(ih, iw, oh, ow):
    mask = rng_pixels(ih * iw, ih, iw) % 2
    got = preprocess.resize_mask(mask, oh, ow)
    assert got.shape == (oh, ow) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref_nearest(mask, oh, ow))


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_prepare_resize_pad_with_mask():
    w, h = 45, 30
    img = rgb_image(5, w, h)
    boxes = [[4, 5, 10, 12], [30, 20, 40, 40]]
    dec = stages.decoder(make_cfg(transforms="RESIZE_PAD", resolution=40, masking=True, crop_resize=False))
    arr, mask = preprocess.prepare(png_bytes(img), True, boxes, dec)
    size = ref_large_side(w, h, 40)
    np.testing.assert_array_equal(arr, np.asarray(img.resize(size, Image.Resampling.BICUBIC)))
    # the mask is made on the original image and resized to the (padded) tensor size
    assert mask.shape == (40, 40)
    np.testing.assert_array_equal(mask, ref_nearest(ref_box_mask(w, h, boxes), 40, 40))


def test_prepare_crop_resize():
    w, h = 60, 40
    img = rgb_image(6, w, h)
    boxes = [[10, 5, 20, 10], [-3, 8, 15, 50]]
    dec = stages.decoder(make_cfg(transforms="RESIZE_LARGE", resolution=32, masking=False, crop_resize=True))
    arr, mask = preprocess.prepare(png_bytes(img), True, boxes, dec)
    assert mask is None
    crop = img.crop((0, 5, 30, 58))  # union: x 0..30, y 5..58 (PIL pads past the bottom)
    exp = crop.resize(ref_large_side(30, 53, 32), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(arr, np.asarray(exp))


# ------------------------------------------------------------ 5. the model stage


def test_model_name_rules():
    for n in ["vit_large_patch14_clip_336.openai", "convnext_large_mlp.clip_laion2b_ft_soup_320",
              "eva02_large_patch14_clip_336.merged2b", "vit_pe_core_base_patch16_224.fb", "RN50_clip"]:
        assert timm_models.keeps_head(n), n
    for n in ["vit_large_patch16_siglip_384.webli", "resnet50", "vit_base_patch14_dinov2.lvd142m",
              "convnext_base", VIT, CNN]:
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
    from ilias_ray.config import UserError
    from ilias_ray.models import check

    with pytest.raises(UserError, match="not supported"):
        check("timm", CNN, pooling="cls", pretrained=False)  # refused on the driver, before Ray
    emb = stages.embedder(make_cfg(model=CNN, pooling="cls"))
    with pytest.raises(ValueError, match="class token"):
        emb.embed_pixels(torch.zeros(1, 32, 32, 3, dtype=torch.uint8))


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


def test_gem_with_negative_map():
    """GeM with m = min(0, min x) on a map that has negative values (the `+ m` shift)."""
    from ilias_ray.models.pooling import pool

    x = torch.randn(2, 5, 3, 4)
    got = pool("gem", x, False)
    exp = torch.zeros(2, 5)
    for i in range(2):
        for c in range(5):
            v = [float(t) for t in x[i, c].flatten()]
            m = min(0.0, min(v))
            exp[i, c] = (sum(max(t + m, 1e-6) ** 3 for t in v) / len(v)) ** (1 / 3) - m
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)


def test_vit_tta_multiscale_multirotate():
    emb = embedder(model=VIT, pooling="head", resolution=64, multiscale=True, multirotate=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(21, 1, 30, 46, 3)
    got = emb.embed_pixels(torch.from_numpy(pixels))
    exp = ref_embed(model, pixels, mean, std, patch=16, pooling="head", token=True,
                    scales=(0.707, 1.0, 1.414), angles=(0, 90, 180, 270))
    torch.testing.assert_close(got, exp, **TOL)
    # and it is not just the single view
    single = ref_embed(model, pixels, mean, std, patch=16, pooling="head", token=True)
    assert not torch.allclose(got, single, atol=1e-4)


def test_cnn_gem_multiscale_with_mask_and_pad():
    emb = embedder(model=CNN, pooling="gem", transforms="RESIZE_PAD", resolution=48,
                   multiscale=True, masking=True)
    model = emb.bb.model
    mean, std = model_mean_std(model)
    pixels = rng_pixels(31, 2, 33, 48, 3)
    mask = rng_pixels(32, 2, 48, 48) % 2
    got = emb.embed_pixels(torch.from_numpy(pixels), torch.from_numpy(mask))
    exp = ref_embed(model, pixels, mean, std, pad=48, mask=mask, pooling="gem",
                    scales=(0.707, 1.0, 1.414))
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
    from ilias_ray.rows import Kind

    emb = stages.embedder(make_cfg(model=CNN, pooling="gem", transforms="RESIZE_LARGE",
                                   resolution=64, min_size=40, masking=True, store_fp16=True))
    model = emb.bb.model
    shapes = [(33, 47), (50, 30), (33, 47), None, (33, 47)]
    masks = [True, False, False, None, True]
    rows = {k: [] for k in ("img", "h", "w", "mask", "kind")}
    exp = []
    for i, (shape, has_mask) in enumerate(zip(shapes, masks)):
        if shape is None:
            rows["img"].append(np.zeros((0, 0, 3), np.uint8)), rows["h"].append(0), rows["w"].append(0)
            rows["mask"].append(np.zeros((0, 0), np.uint8)), rows["kind"].append(Kind.SKIP)
            exp.append(None)
            continue
        h, w = shape
        px = rng_pixels(80 + i, 1, h, w, 3)
        th, tw = max(h, 40), max(w, 40)
        m = (rng_pixels(90 + i, 1, th, tw) % 2) if has_mask else None
        rows["img"].append(px[0]), rows["h"].append(h), rows["w"].append(w)
        rows["mask"].append(m[0] if has_mask else np.zeros((0, 0), np.uint8)), rows["kind"].append(Kind.IMAGE)
        exp.append(ref_embed(model, px, IMAGENET_MEAN, IMAGENET_STD, pad=40, mask=m, pooling="gem")[0])
    n = len(shapes)
    batch = {
        "seq": np.arange(n, dtype=np.int64), "out": np.zeros(n, np.int32), "unit": np.zeros(n, np.int32),
        "pos": np.arange(n, dtype=np.int64), "id": np.array([str(i) for i in range(n)], dtype=object),
        "kind": np.array(rows["kind"], dtype=np.int8), "note": np.array([""] * n, dtype=object),
        "off": np.zeros(n, np.int64), "data": np.array([b""] * n, dtype=object),
        "img": objects(rows["img"]), "h": np.array(rows["h"], np.int32),
        "w": np.array(rows["w"], np.int32), "mask": objects(rows["mask"]),
    }
    out = emb(batch)
    for i in range(n):
        if exp[i] is None:
            assert out["feat"][i] == b"" and out["nvec"][i] == 0
            continue
        f = np.frombuffer(out["feat"][i], np.float16)
        assert out["nvec"][i] == 1
        np.testing.assert_allclose(f.astype(np.float32), exp[i].numpy().astype(np.float16).astype(np.float32),
                                   rtol=0, atol=1e-3)


# ------------------------------------------------------------------ 6. decoding


def jpeg_with_orientation(arr, orientation):
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation,rot", [(6, -1), (8, 1), (3, 2)])
def test_decode_exif(orientation, rot):
    arr = rng_pixels(orientation, 24, 40, 3)
    data = jpeg_with_orientation(arr, orientation)
    raw = Image.open(io.BytesIO(data)).convert("RGB")
    raw_a = np.asarray(raw)
    assert raw.size == (40, 24)

    tar = preprocess.decode_image(data, False)  # tar: no transposition
    assert tar.mode == "RGB" and tar.size == (40, 24)
    np.testing.assert_array_equal(np.asarray(tar), raw_a)

    folder = preprocess.decode_image(data, True)  # folder: EXIF-transposed
    assert folder.mode == "RGB"
    exp = np.rot90(raw_a, k=rot)  # 6: 90 deg clockwise, 8: counter-clockwise, 3: 180
    assert folder.size == (exp.shape[1], exp.shape[0])
    np.testing.assert_array_equal(np.asarray(folder), exp)
    np.testing.assert_array_equal(np.asarray(folder), np.asarray(ImageOps.exif_transpose(raw)))


def test_prepare_tar_vs_folder_exif():
    arr = rng_pixels(99, 24, 40, 3)
    data = jpeg_with_orientation(arr, 6)
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    dec = stages.decoder(make_cfg(transforms="RESIZE_LARGE", resolution=20))
    tar_arr, _ = preprocess.prepare(data, False, None, dec)
    folder_arr, _ = preprocess.prepare(data, True, None, dec)
    assert tar_arr.shape == (12, 20, 3)
    assert folder_arr.shape == (20, 12, 3)
    exp = Image.fromarray(np.ascontiguousarray(np.rot90(raw, -1))).resize((12, 20), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(folder_arr, np.asarray(exp))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_decode_modes_end_rgb(mode):
    base = rgb_image(3, 17, 11)
    if mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        img = Image.fromarray(rng_pixels(4, 11, 17).astype(np.uint16) * 200)
        assert img.mode.startswith("I")
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    data = buf.getvalue()
    for exif in (False, True):
        out = preprocess.decode_image(data, exif)
        assert out.mode == "RGB" and out.size == (17, 11)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_cpu_chunks_do_not_change_features():
    """On a CPU a batch runs in small forward passes (cache-sized); the features must not change."""
    emb = stages.embedder(make_cfg(model=CNN, pooling="gem", transforms="RESIZE_LARGE", resolution=64,
                                   min_size=40, multiscale=True))
    px = torch.from_numpy(rng_pixels(7, 5, 33, 47, 3))
    mask = torch.from_numpy(rng_pixels(8, 5, 40, 47) % 2)
    assert emb.chunk((33, 47)) >= 5  # small images: the whole batch in one pass
    whole = emb.embed_pixels(px, mask)
    emb.chunk_pixels = 1  # one image per pass
    assert emb.chunk((33, 47)) == 1
    torch.testing.assert_close(emb.embed_pixels(px, mask), whole, **TOL)
