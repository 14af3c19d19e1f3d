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
import struct
import subprocess
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile, ImageOps

import stage_settings as stages
from ilias_ray.plan_types import Source
from ilias_ray.stages import decode as preprocess
from ilias_ray.stages.rows import State, object_column
from ilias_ray.testing.batches import routed
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


GUARD_PIXELS = 30_000_000  # over any image these tests need, far under what the hostile ones ask


@pytest.fixture(autouse=True)
def guard(monkeypatch):
    """Records every load, crop and resize; refuses those over GUARD_PIXELS."""
    seen = {"load": [], "crop": [], "resize": []}
    load, crop, resize = ImageFile.ImageFile.load, Image.Image.crop, Image.Image.resize

    def check(what, size):
        seen[what].append(tuple(size))
        if size[0] * size[1] > GUARD_PIXELS:
            raise MemoryError(f"test guard: {what} of {size[0]}x{size[1]}")

    def guarded_load(self):
        if self._im is None:  # the first load allocates the whole image
            check("load", self.size)
        return load(self)

    def guarded_crop(self, box=None):
        if box is not None:
            check("crop", (box[2] - box[0], box[3] - box[1]))
        return crop(self, box)

    def guarded_resize(self, size, *a, **kw):
        check("resize", size)
        return resize(self, size, *a, **kw)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    monkeypatch.setattr(Image.Image, "crop", guarded_crop)
    monkeypatch.setattr(Image.Image, "resize", guarded_resize)
    return seen


def cfg(transforms="RESIZE_LARGE", resolution=64, **over):
    c = {"transforms": transforms, "resolution": resolution, "min_size": 0, "crop_resize": False, "masking": False}
    c.update(over)
    return preprocess.Decoder(**c)


def batch(rows: list) -> dict:
    """A decode-stage batch of (source, data[, boxes]) rows, as the read stage makes them."""
    n = len(rows)
    return routed(
        n,
        source=np.array([r[0] for r in rows], np.int8),
        data=object_column([r[1] for r in rows]),
        boxes=object_column([r[2] if len(r) > 2 else "" for r in rows]),
    )


def decode(rows: list, **c) -> list:
    """(state, reason, pixels) of each row after the decode stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's warning must not leak
        out = preprocess.decode_batch(batch(rows), cfg(**c))
    return list(zip(out["state"].tolist(), out["reason"].tolist(), out["img"]))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def photo(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8), "RGB")


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (1-bit gray) and whose data is a few bytes: no pixels at all."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(w: int, h: int) -> bytes:
    """A small valid JPEG whose header claims w x h pixels."""
    raw = bytearray(encoded(photo(32, 24), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(raw)


@pytest.mark.parametrize("make", [png_header_only, jpeg_claiming])
def test_over_pillows_limit_is_an_error_even_below_twice_it(make, guard):
    """10000x10000 is 1.1x Pillow's MAX_IMAGE_PIXELS: Pillow only warns there and then decodes.
    Here it is a skip with DecompressionBombError, decided from the header: nothing is loaded."""
    assert Image.MAX_IMAGE_PIXELS == 89478485 < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    ((kind, note, px),) = decode([(Source.TAR, make(10000, 10000))])
    assert kind == State.SKIPPED and px.size == 0
    assert note == (
        "decode failed: DecompressionBombError: Image size (100000000 pixels) exceeds limit "
        "of 89478485 pixels, could be decompression bomb DOS attack."
    )
    assert guard["load"] == [] and guard["resize"] == []
    # Just under the limit is opened (here: a header with no pixel data, so it fails in the decoder).
    assert preprocess.MAX_SOURCE_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's default, kept
    side = int(preprocess.MAX_SOURCE_PIXELS**0.5)
    ((kind, note, _),) = decode([(Source.FOLDER, png_header_only(side, side))])
    assert kind == State.SKIPPED and "DecompressionBomb" not in note and guard["load"] == [(side, side)], note


def test_the_issues_1x50000_png_under_resize_small_is_a_skip_before_any_resize(guard):
    """The image that stalled a run: 1x50,000 at RESIZE_SMALL 512 would be 512x25,600,000."""
    data = encoded(photo(1, 50000), "PNG")
    for transforms in ("RESIZE_SMALL", "RESIZE_CENTER"):
        ((kind, note, px),) = decode([(Source.TAR, data)], transforms=transforms, resolution=512)
        assert kind == State.SKIPPED and px.size == 0
        assert note == (
            f"decode failed: ImageTooLarge: {transforms} at resolution 512 makes 1x50000 into "
            "512x25600000 (13107200000 pixels), over 64 x 512^2 = 16777216"
        )
    assert guard["resize"] == []  # nothing was resized: the size was refused first
    # The other transforms make it small: it is embedded as the reference does.
    for transforms, shape in (
        ("RESIZE_LARGE", (512, 1, 3)),
        ("RESIZE_PAD", (512, 1, 3)),
        ("RESIZE_SQUARE", (512, 512, 3)),
    ):
        ((kind, note, px),) = decode([(Source.TAR, data)], transforms=transforms, resolution=512)
        assert kind == State.PIXELS and px.shape == shape, (transforms, note)


@pytest.mark.parametrize("transforms", ["RESIZE_SMALL", "RESIZE_CENTER"])
def test_aspect_ratio_limit_is_64_to_1_under_shorter_side_resizes(transforms):
    at = encoded(photo(64 * 32, 32), "PNG")  # 64:1 -> 4096x64 at 64: exactly 64 x 64^2 pixels
    over = encoded(photo(64 * 32 + 1, 32), "PNG")
    tall = encoded(photo(32, 64 * 32 + 1), "PNG")
    (k1, _, px), (k2, n2, _), (k3, n3, _) = decode(
        [(Source.TAR, at), (Source.TAR, over), (Source.FOLDER, tall)], transforms=transforms, resolution=64
    )
    assert k1 == State.PIXELS and px.shape == ((64, 4096, 3) if transforms == "RESIZE_SMALL" else (64, 64, 3))
    assert k2 == k3 == State.SKIPPED
    assert n2 == (
        f"decode failed: ImageTooLarge: {transforms} at resolution 64 makes 2049x32 "
        "into 4098x64 (262272 pixels), over 64 x 64^2 = 262144"
    )
    assert "makes 32x2049 into 64x4098 (262272 pixels)" in n3


def test_output_and_crop_stay_within_pillows_limit_too(guard):
    # At resolution 1300, 64 x 1300^2 is over Pillow's limit, which then bounds the output instead:
    # 10x640 (64:1) would be 1300x83200, 108 M pixels.
    ((kind, note, _),) = decode(
        [(Source.TAR, encoded(photo(10, 640), "PNG"))], transforms="RESIZE_SMALL", resolution=1300
    )
    assert kind == State.SKIPPED and note == (
        "decode failed: ImageTooLarge: RESIZE_SMALL at resolution 1300 makes 10x640 "
        "into 1300x83200 (108160000 pixels), over 89478485 (Pillow's limit)"
    )
    # --crop_resize with boxes reaching far past a small image's edges: the union is the crop.
    boxes = "[[0, 0, 10000, 10000]]"
    ((kind, note, _),) = decode([(Source.FOLDER, encoded(photo(40, 30), "JPEG"), boxes)], crop_resize=True)
    assert kind == State.SKIPPED and note == (
        "decode failed: ImageTooLarge: the boxes' union 10000x10000 is over 89478485 pixels (Pillow's limit)"
    )
    assert guard["resize"] == [] and guard["crop"] == []
    # Boxes inside the image crop and resize as before.
    ((kind, note, px),) = decode(
        [(Source.FOLDER, encoded(photo(40, 30), "JPEG"), "[[2, 3, 20, 10]]")], crop_resize=True
    )
    assert kind == State.PIXELS and px.shape == (32, 64, 3) and guard["crop"] == [(20, 10)]


def test_transform_sizes_match_what_resize_makes():
    """The limit is checked on sizes computed ahead; they are the sizes resize() then makes."""
    for w, h in ((1, 1), (5, 300), (300, 5), (640, 480), (481, 640), (1000, 999), (37, 53)):
        img = photo(w, h)
        for transforms in ("RESIZE_LARGE", "RESIZE_PAD", "RESIZE_SMALL", "RESIZE_SQUARE"):
            for s in (7, 64, 224):
                assert preprocess.resize(img, transforms, s).size == preprocess.transform_sizes(w, h, transforms, s)


def eps() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
        b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
    )


def test_eps_is_not_opened_and_runs_no_program(monkeypatch):
    """Pillow renders EPS with Ghostscript, an external program: such files are never opened."""
    ran = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **kw: ran.append("Ghostscript") or 1 / 0)
    real_popen = subprocess.Popen

    def popen(*a, **kw):
        ran.append(a[0] if a else kw.get("args"))
        return real_popen(*a, **kw)

    monkeypatch.setattr(subprocess, "Popen", popen)
    assert Image.open(io.BytesIO(eps())).format == "EPS"  # Pillow itself would open it
    (kind, note, _), (k2, n2, _) = decode([(Source.TAR, eps()), (Source.FOLDER, eps())])
    assert kind == k2 == State.SKIPPED
    assert note == n2 == "decode failed: UnidentifiedImageError: cannot identify image file"
    assert ran == []


def mpo() -> bytes:
    b = io.BytesIO()
    photo(40, 30, 1).save(b, "MPO", save_all=True, append_images=[photo(40, 30, 2)])
    return b.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"])
def test_allowed_formats_decode_to_the_same_pixels(fmt):
    data = mpo() if fmt == "MPO" else encoded(photo(40, 30, 3), fmt)
    ref = Image.open(io.BytesIO(data))
    assert ref.format == fmt
    for exif in (False, True):
        np.testing.assert_array_equal(np.asarray(preprocess.decode_image(data, exif)), np.asarray(ref.convert("RGB")))


def test_text_that_is_not_utf8_or_too_large_is_a_skip():
    ok = "a photo of the Eiffel tower, at night ✓".encode()
    biggest = b"x" * 65536  # MAX_TEXT_BYTES
    rows = [(Source.TEXT, t) for t in (ok, b"caf\xe9 latin-1", biggest + b"x", biggest, b"")]
    out = preprocess.decode_batch(batch(rows), cfg())
    assert out["state"].tolist() == [State.BYTES, State.SKIPPED, State.SKIPPED, State.BYTES, State.BYTES]
    assert out["reason"].tolist() == [
        "",
        "text is not valid UTF-8: 'utf-8' codec can't decode byte 0xe9 in position 3: invalid continuation byte",
        "text too large: 65537 bytes, over 65536",
        "",
        "",
    ]
    # Rows that go on are unchanged; skipped ones drop their bytes (the model stage never sees them).
    assert [bytes(d) for d in out["data"]] == [ok, b"", b"", biggest, b""]
    assert preprocess.MAX_TEXT_BYTES == len(biggest)


def test_bad_text_queries_are_recorded_skips_not_a_failed_run(ray_cluster, tmp_path):
    """End to end: a query file that is not UTF-8, and one over MAX_TEXT_BYTES, are skipped with
    their reasons; the others are embedded. (Without the check, the model stage's decode raised
    and failed the run.)"""
    import h5py

    from ilias_ray.config import Config
    from ilias_ray.job.run import run

    q = tmp_path / "data" / "inst1" / "query"
    q.mkdir(parents=True)
    (q / "T001.txt").write_text("a photo of a red bicycle\n", encoding="utf-8")
    (q / "T002.txt").write_bytes(b"caf\xe9 au lait")  # Latin-1
    (q / "T003.txt").write_bytes(b"word " * 20_000)  # 100,000 bytes
    (q / "T004.txt").write_text("une tour Eiffel, la nuit", encoding="utf-8")
    run(
        Config(
            dataset_dir=str(tmp_path / "data"),
            hdf5_dir=str(tmp_path / "out"),
            partition="text_queries",
            framework="text",
            model="RN50.openai",
            pretrained=False,
        )
    )
    with h5py.File(tmp_path / "out" / "features_text_queries.hdf5", "r") as f:
        assert list(f["index"].asstr()[()]) == ["inst1/query/T001.txt", "inst1/query/T004.txt"]
        assert np.isfinite(f["features"][()].astype(np.float32)).all()
        assert dict(zip(f["skipped_index"].asstr()[()], f["skipped_reason"].asstr()[()])) == {
            "inst1/query/T002.txt": "text is not valid UTF-8: 'utf-8' codec can't decode byte 0xe9 in position 3: "
            "invalid continuation byte",
            "inst1/query/T003.txt": "text too large: 100000 bytes, over 65536",
        }
