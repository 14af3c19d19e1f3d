"""Limits on hostile files, in the decode stage on its own (no Ray): images too large to decode or to
resize, formats that are not opened, text queries that cannot be embedded. Each is a recorded SKIP
row with its reason, decided before anything large is allocated; ordinary images are unchanged.

Every test here runs under `guard`, which refuses (with MemoryError) any load, crop or resize that
would allocate more than GUARD_PIXELS, so that code without the limits fails these tests quickly
instead of asking for tens of GB."""

from __future__ import annotations

import io
import struct
import subprocess
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from ilias_ray import preprocess
from ilias_ray.rows import Kind

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
    """A decode-stage batch of (kind, data[, boxes]) rows, as the read stage makes them."""
    n = len(rows)
    return {
        "seq": np.arange(n),
        "out": np.zeros(n, np.int32),
        "unit": np.zeros(n, np.int32),
        "pos": np.arange(n),
        "id": np.array([f"r{i}" for i in range(n)], dtype=object),
        "kind": np.array([r[0] for r in rows], np.int8),
        "data": preprocess.object_column([r[1] for r in rows]),
        "note": np.array([""] * n, dtype=object),
        "off": np.zeros(n, np.int64),
        "boxes": np.array([r[2] if len(r) > 2 else "" for r in rows], dtype=object),
    }


def decode(rows: list, **c) -> list:
    """(kind, note, pixels) of each row after the decode stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow's warning must not leak
        out = preprocess.decode_batch(batch(rows), cfg(**c))
    return list(zip(out["kind"].tolist(), out["note"].tolist(), out["img"]))


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


# ------------------------------------------------------------------ pixels over Pillow's limit


@pytest.mark.parametrize("make", [png_header_only, jpeg_claiming])
def test_over_pillows_limit_is_an_error_even_below_twice_it(make, guard):
    """10000x10000 is 1.1x Pillow's MAX_IMAGE_PIXELS: Pillow only warns there and then decodes.
    Here it is a skip with DecompressionBombError, decided from the header: nothing is loaded."""
    assert Image.MAX_IMAGE_PIXELS == 89478485 < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    ((kind, note, px),) = decode([(Kind.TAR_IMAGE, make(10000, 10000))])
    assert kind == Kind.SKIP and px.size == 0
    assert note == (
        "decode failed: DecompressionBombError: Image size (100000000 pixels) exceeds limit "
        "of 89478485 pixels, could be decompression bomb DOS attack."
    )
    assert guard["load"] == [] and guard["resize"] == []
    # Just under the limit is opened (here: a header with no pixel data, so it fails in the decoder).
    assert preprocess.MAX_SOURCE_PIXELS == Image.MAX_IMAGE_PIXELS  # Pillow's default, kept
    side = int(preprocess.MAX_SOURCE_PIXELS**0.5)
    ((kind, note, _),) = decode([(Kind.FILE_IMAGE, png_header_only(side, side))])
    assert kind == Kind.SKIP and "DecompressionBomb" not in note and guard["load"] == [(side, side)], note


# ------------------------------------------------------------------ sizes the transform would make


def test_the_issues_1x50000_png_under_resize_small_is_a_skip_before_any_resize(guard):
    """The image that stalled a run: 1x50,000 at RESIZE_SMALL 512 would be 512x25,600,000."""
    data = encoded(photo(1, 50000), "PNG")
    for transforms in ("RESIZE_SMALL", "RESIZE_CENTER"):
        ((kind, note, px),) = decode([(Kind.TAR_IMAGE, data)], transforms=transforms, resolution=512)
        assert kind == Kind.SKIP and px.size == 0
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
        ((kind, note, px),) = decode([(Kind.TAR_IMAGE, data)], transforms=transforms, resolution=512)
        assert kind == Kind.IMAGE and px.shape == shape, (transforms, note)


@pytest.mark.parametrize("transforms", ["RESIZE_SMALL", "RESIZE_CENTER"])
def test_aspect_ratio_limit_is_64_to_1_under_shorter_side_resizes(transforms):
    at = encoded(photo(64 * 32, 32), "PNG")  # 64:1 -> 4096x64 at 64: exactly 64 x 64^2 pixels
    over = encoded(photo(64 * 32 + 1, 32), "PNG")
    tall = encoded(photo(32, 64 * 32 + 1), "PNG")
    (k1, _, px), (k2, n2, _), (k3, n3, _) = decode(
        [(Kind.TAR_IMAGE, at), (Kind.TAR_IMAGE, over), (Kind.FILE_IMAGE, tall)], transforms=transforms, resolution=64
    )
    assert k1 == Kind.IMAGE and px.shape == ((64, 4096, 3) if transforms == "RESIZE_SMALL" else (64, 64, 3))
    assert k2 == k3 == Kind.SKIP
    assert n2 == (
        f"decode failed: ImageTooLarge: {transforms} at resolution 64 makes 2049x32 "
        "into 4098x64 (262272 pixels), over 64 x 64^2 = 262144"
    )
    assert "makes 32x2049 into 64x4098 (262272 pixels)" in n3


def test_output_and_crop_stay_within_pillows_limit_too(guard):
    # At resolution 1300, 64 x 1300^2 is over Pillow's limit, which then bounds the output instead:
    # 10x640 (64:1) would be 1300x83200, 108 M pixels.
    ((kind, note, _),) = decode(
        [(Kind.TAR_IMAGE, encoded(photo(10, 640), "PNG"))], transforms="RESIZE_SMALL", resolution=1300
    )
    assert kind == Kind.SKIP and note == (
        "decode failed: ImageTooLarge: RESIZE_SMALL at resolution 1300 makes 10x640 "
        "into 1300x83200 (108160000 pixels), over 89478485 (Pillow's limit)"
    )
    # --crop_resize with boxes reaching far past a small image's edges: the union is the crop.
    boxes = "[[0, 0, 10000, 10000]]"
    ((kind, note, _),) = decode([(Kind.FILE_IMAGE, encoded(photo(40, 30), "JPEG"), boxes)], crop_resize=True)
    assert kind == Kind.SKIP and note == (
        "decode failed: ImageTooLarge: the boxes' union 10000x10000 is over 89478485 pixels (Pillow's limit)"
    )
    assert guard["resize"] == [] and guard["crop"] == []
    # Boxes inside the image crop and resize as before.
    ((kind, note, px),) = decode(
        [(Kind.FILE_IMAGE, encoded(photo(40, 30), "JPEG"), "[[2, 3, 20, 10]]")], crop_resize=True
    )
    assert kind == Kind.IMAGE and px.shape == (32, 64, 3) and guard["crop"] == [(20, 10)]


def test_transform_sizes_match_what_resize_makes():
    """The limit is checked on sizes computed ahead; they are the sizes resize() then makes."""
    for w, h in ((1, 1), (5, 300), (300, 5), (640, 480), (481, 640), (1000, 999), (37, 53)):
        img = photo(w, h)
        for transforms in ("RESIZE_LARGE", "RESIZE_PAD", "RESIZE_SMALL", "RESIZE_SQUARE"):
            for s in (7, 64, 224):
                assert preprocess.resize(img, transforms, s).size == preprocess.transform_sizes(w, h, transforms, s)


# ------------------------------------------------------------------ formats


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
    (kind, note, _), (k2, n2, _) = decode([(Kind.TAR_IMAGE, eps()), (Kind.FILE_IMAGE, eps())])
    assert kind == k2 == Kind.SKIP and note == n2 == "decode failed: UnidentifiedImageError: cannot identify image file"
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


# ------------------------------------------------------------------ text queries


def test_text_that_is_not_utf8_or_too_large_is_a_skip():
    ok = "a photo of the Eiffel tower, at night ✓".encode()
    biggest = b"x" * 65536  # MAX_TEXT_BYTES
    rows = [(Kind.TEXT, t) for t in (ok, b"caf\xe9 latin-1", biggest + b"x", biggest, b"")]
    out = preprocess.decode_batch(batch(rows), cfg())
    assert out["kind"].tolist() == [Kind.TEXT, Kind.SKIP, Kind.SKIP, Kind.TEXT, Kind.TEXT]
    assert out["note"].tolist() == [
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
    from ilias_ray.pipeline import run

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
