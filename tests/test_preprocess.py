"""ilias_ray.preprocess (spec 3 and 4) checked against independent computations: Pillow,
torchvision's rules and hand-written loops (see tests/reference.py for the ground rules).

Blocks, as numbered in the former tests/test_math.py:
- 1. resize sizes/pixels (spec 4): LargeSideResize's size formula and Pillow bicubic pixels,
  torchvision's Resize / CenterCrop / square resize, and the padding target of each transform.
- 4. boxes (spec 4, bounding boxes): the clipped union for crop_resize, the box mask, its
  nearest-neighbour resize, and `prepare` with masking and with crop_resize.
- 6. decoding (spec 3): EXIF orientation applied to folder images and not to tar images,
  every Pillow mode ending as RGB.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import stages
from ilias_ray import preprocess
from reference import make_cfg, rng_pixels


def rgb_image(seed, w, h):
    return Image.fromarray(rng_pixels(seed, h, w, 3), "RGB")


def ref_large_side(w, h, s):
    """Spec 4: ar = H / W; ar <= 1 -> (s, int(s * ar)) else (int(s / ar), s); each >= 1."""
    ar = h / w
    if ar <= 1:
        nw, nh = s, int(s * ar)
    else:
        nw, nh = int(s / ar), s
    return (nw if nw >= 1 else 1, nh if nh >= 1 else 1)


# ------------------------------------------------------------ 1. resize sizes/pixels

SIZES = [
    (1, 1),
    (1, 7),
    (7, 1),
    (1, 1000),
    (1000, 1),
    (2, 3),
    (3, 2),
    (640, 480),
    (480, 640),
    (512, 512),
    (100, 100),
    (1000, 333),
    (333, 1000),
    (1024, 683),
    (683, 1024),
    (4000, 3),
    (3, 4000),
    (799, 800),
    (800, 799),
    (37, 23),
    (23, 37),
    (5000, 4999),
    (12, 7),
    (7, 12),
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
    [
        (23, 37, 23, 37),
        (23, 37, 46, 74),
        (23, 37, 64, 64),
        (100, 333, 30, 100),
        (3, 7, 7, 3),
        (1, 1, 5, 5),
        (50, 60, 1, 1),
        (97, 41, 224, 96),
        (333, 1000, 170, 512),
    ],
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
