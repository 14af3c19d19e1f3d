"""Build a tiny, deterministic ILIAS-shaped sample dataset for tests and demos.

The sample mirrors the two inputs of the real pipeline:

* ``root/core/`` -- an ILIAS-core-like folder of instances, each with one query
  image, one text query and three positives, plus ``*_bbox.txt`` box files;
* ``root/yfcc/`` -- WebDataset-style tar shards of distractor images (YFCC100M
  style), including one corrupt JPEG and one sample without an image.

All pixels come from photos shipped with scikit-image (``skimage.data``), which
load offline; scikit-image is the ``demo`` extra, not a runtime dependency
(without it, building a sample is a one-line user error).  All randomness comes
from ``numpy.random.RandomState(seed)``, and every file is written with fixed
metadata, so the same seed gives byte-identical files.

Conventions worth knowing when consuming the sample:

* Box files hold one or two lines ``x y w h`` (integers, top-left corner) in the
  coordinates of the image *as displayed*, i.e. after applying its EXIF
  orientation (``PIL.ImageOps.exif_transpose``).
* Exactly one query JPEG carries EXIF orientation 6 ("rotate 90 CW to
  display"); its stored pixel array is therefore ``h x w`` transposed relative
  to the displayed image.  Its path (relative to ``core``) is returned as
  ``exif_query``.
* Exactly one instance folder has a non-ASCII name (``café_001`` when there are
  at least two instances).
"""

from __future__ import annotations

import functools
import io
import json
import pathlib
import tarfile
from typing import Iterable

import numpy as np
from PIL import Image

from ilias_ray.errors import UserError

__all__ = ["build_sample", "write_selected_ids", "EXIF_ORIENTATION_TAG"]

EXIF_ORIENTATION_TAG = 0x0112

# skimage.data photos that ship with scikit-image (no pooch download needed).
_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)

# (ascii folder name, photo used for the instance, one-line text description)
_INSTANCES = (
    ("astronaut_portrait", "astronaut", "A portrait of an astronaut in a white spacesuit in front of a flag."),
    ("cafe", "coffee", "A cup of coffee on a saucer, served at a café table."),
    ("tabby_cat", "chelsea", "A ginger tabby cat looking to the side."),
    ("launch_rocket", "rocket", "A rocket standing on its launch pad under a blue sky."),
    ("deep_field", "hubble_deep_field", "A telescope view of many distant galaxies on a black background."),
    ("tissue_stain", "immunohistochemistry", "A microscope image of stained tissue with brown and blue cells."),
    ("eye_retina", "retina", "A photograph of a human retina with branching blood vessels."),
    ("camera_man", "camera", "A black and white photo of a man standing behind a camera on a tripod."),
)
_NON_ASCII_NAME = "café"

# Flickr-like (w, h) sizes for distractors.
_FLICKR_SIZES = ((500, 375), (375, 500), (240, 180), (320, 240), (240, 320))

_TAR_FORMAT = tarfile.GNU_FORMAT


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> Image.Image:
    try:
        import skimage.data
    except ImportError as e:  # not a runtime dependency: `pip install .` leaves it out
        raise UserError("the demo needs scikit-image: pip install 'ilias-ray[demo]' (make demo installs it)") from e

    arr = np.asarray(getattr(skimage.data, name)())
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    arr = arr[..., :3].astype(np.uint8, copy=False)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def _odd_side(rng: np.random.RandomState, lo: int, hi: int) -> int:
    """Random side length in [lo, hi] that is not a multiple of 16."""
    while True:
        s = int(rng.randint(lo, hi + 1))
        if s % 16:
            return s


def _crop_resize(rng: np.random.RandomState, photo: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Random crop of ``photo`` (roughly matching the target aspect) resized to ``size``."""
    pw, ph = photo.size
    tw, th = size
    scale = float(rng.uniform(0.55, 1.0))
    aspect = tw / th
    cw = min(pw, max(16, int(round(scale * min(pw, ph * aspect)))))
    ch = min(ph, max(16, int(round(cw / aspect))))
    x0 = int(rng.randint(0, pw - cw + 1))
    y0 = int(rng.randint(0, ph - ch + 1))
    return photo.crop((x0, y0, x0 + cw, y0 + ch)).resize((tw, th), Image.BILINEAR)


def _random_boxes(rng: np.random.RandomState, w: int, h: int) -> list[tuple[int, int, int, int]]:
    boxes = []
    for _ in range(int(rng.randint(1, 3))):  # one or two boxes
        bw = int(rng.randint(max(1, w // 5), max(2, (w * 4) // 5) + 1))
        bh = int(rng.randint(max(1, h // 5), max(2, (h * 4) // 5) + 1))
        x = int(rng.randint(0, w - bw + 1))
        y = int(rng.randint(0, h - bh + 1))
        boxes.append((x, y, bw, bh))
    return boxes


def _jpeg_bytes(img: Image.Image, quality: int, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    kw = {"quality": int(quality)}
    if exif is not None:
        kw["exif"] = exif
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _write(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _bbox_path(image_path: pathlib.Path) -> pathlib.Path:
    return image_path.with_name(image_path.stem + "_bbox.txt")


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.convert("RGB")
        return True
    except Exception:
        return False


def _corrupt_jpeg(rng: np.random.RandomState, valid: bytes) -> bytes:
    """A JPEG that starts like a real one but whose data is garbage/truncated."""
    from PIL import ImageFile

    for _ in range(100):
        head = valid[:20]  # SOI + part of the JFIF APP0 segment
        tail = rng.randint(0, 256, size=int(rng.randint(200, 600))).astype(np.uint8).tobytes()
        data = head + tail
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        try:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            strict_fail = not _decodes(data)
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            lenient_fail = not _decodes(data)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old
        if strict_fail and lenient_fail:
            return data
    raise RuntimeError("could not produce an undecodable JPEG")  # pragma: no cover


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(data))


def _build_core(rng: np.random.RandomState, core: pathlib.Path, n_instances: int) -> dict:
    non_ascii_idx = min(1, n_instances - 1)
    png_idx = 0  # positive k=2 of this instance is a .png
    upper_idx = min(2, n_instances - 1)  # positive k=1 of this instance is a .JPG
    exif_idx = min(3, n_instances - 1)  # its query gets EXIF orientation 6

    exif_query = None
    n_q = n_p = n_t = 0
    for i in range(n_instances):
        ascii_name, photo_name, text = _INSTANCES[i % len(_INSTANCES)]
        name = _NON_ASCII_NAME if i == non_ascii_idx else ascii_name
        if i == non_ascii_idx and photo_name != "coffee":
            text = f"{text} (café edition)"
        inst = core / f"{name}_{i:03d}"
        photo = _photo(photo_name)

        # Query image + text.
        landscape = i % 2 == 0
        a, b = _odd_side(rng, 260, 400), _odd_side(rng, 150, 250)
        w, h = (a, b) if landscape else (b, a)
        q_img = _crop_resize(rng, photo, (w, h))
        q_path = inst / "query" / f"Q{i:03d}_00.jpg"
        boxes = _random_boxes(rng, w, h)  # in displayed (upright) coordinates
        if i == exif_idx:
            exif = Image.Exif()
            exif[EXIF_ORIENTATION_TAG] = 6
            # Orientation 6: stored pixels must be rotated 90 CW to display, so
            # store the upright image rotated 90 CCW.
            stored = q_img.transpose(Image.Transpose.ROTATE_90)
            _write(q_path, _jpeg_bytes(stored, 90, exif=exif))
            exif_query = q_path.relative_to(core).as_posix()
        else:
            _write(q_path, _jpeg_bytes(q_img, 90))
        _write(_bbox_path(q_path), _boxes_text(boxes))
        _write(inst / "query" / f"T{i:03d}.txt", (text + "\n").encode("utf-8"))
        n_q += 1
        n_t += 1

        # Positives.
        for k in range(3):
            portrait = (i + k) % 2 == 0
            a, b = _odd_side(rng, 230, 400), _odd_side(rng, 150, 229)
            w, h = (b, a) if portrait else (a, b)
            p_img = _crop_resize(rng, photo, (w, h))
            if i == png_idx and k == 2:
                p_path, data = inst / "pos" / f"P{i:03d}_{k:02d}.png", _png_bytes(p_img)
            elif i == upper_idx and k == 1:
                p_path, data = inst / "pos" / f"P{i:03d}_{k:02d}.JPG", _jpeg_bytes(p_img, 90)
            else:
                p_path, data = inst / "pos" / f"P{i:03d}_{k:02d}.jpg", _jpeg_bytes(p_img, 90)
            _write(p_path, data)
            _write(_bbox_path(p_path), _boxes_text(_random_boxes(rng, w, h)))
            n_p += 1
    return {"n_queries": n_q, "n_positives": n_p, "n_texts": n_t, "exif_query": exif_query}


def _boxes_text(boxes: Iterable[tuple[int, int, int, int]]) -> bytes:
    return "".join(f"{x} {y} {w} {h}\n" for x, y, w, h in boxes).encode("ascii")


def _build_yfcc(rng: np.random.RandomState, yfcc: pathlib.Path, n_shards: int, per_shard: int) -> dict:
    yfcc.mkdir(parents=True, exist_ok=True)
    corrupt_j = min(3, per_shard - 1)
    nonimage_j = min(7, per_shard - 1)
    if nonimage_j == corrupt_j:  # tiny shards: keep the two special samples apart
        nonimage_j = corrupt_j - 1 if corrupt_j > 0 else None

    distractor_keys: list[str] = []
    corrupt_ids: list[str] = []
    nonimage_ids: list[str] = []
    for s in range(n_shards):
        shard_name = f"{s:05d}.tar"
        with tarfile.open(yfcc / shard_name, "w", format=_TAR_FORMAT) as tar:
            for j in range(per_shard):
                key = f"{s * 1000000 + j + 1000:d}"
                sid = f"{shard_name}/{key}"
                meta = json.dumps({"key": key}, sort_keys=True).encode("utf-8")
                if s == 0 and j == nonimage_j:
                    txt = f"Sample {key} has no image, only text.\n".encode("utf-8")
                    _add_member(tar, f"{key}.txt", txt)
                    _add_member(tar, f"{key}.json", meta)
                    nonimage_ids.append(sid)
                    continue
                photo = _photo(_PHOTOS[int(rng.randint(len(_PHOTOS)))])
                size = _FLICKR_SIZES[int(rng.randint(len(_FLICKR_SIZES)))]
                quality = int(rng.randint(75, 96))
                data = _jpeg_bytes(_crop_resize(rng, photo, size), quality)
                if s == 0 and j == corrupt_j:
                    data = _corrupt_jpeg(rng, data)
                    corrupt_ids.append(sid)
                _add_member(tar, f"{key}.jpg", data)
                _add_member(tar, f"{key}.json", meta)
                distractor_keys.append(sid)
    return {
        "distractor_keys": distractor_keys,
        "corrupt_ids": corrupt_ids,
        "nonimage_ids": nonimage_ids,
    }


def build_sample(
    root: pathlib.Path,
    n_instances: int = 4,
    n_shards: int = 3,
    per_shard: int = 20,
    seed: int = 0,
) -> dict:
    """Create the sample dataset under ``root`` and describe it.

    Returns a dict with keys ``core`` and ``yfcc`` (paths), ``n_queries``,
    ``n_positives``, ``n_texts``, ``n_shards``, ``distractor_keys`` (ids
    ``"{shard}/{key}"`` of every tar sample that has a ``.jpg`` member, in tar
    order -- including the corrupt one), ``corrupt_ids``, ``nonimage_ids`` and
    ``exif_query`` (path of the EXIF-rotated query relative to ``core``).
    """
    if n_instances < 1 or n_shards < 1 or per_shard < 1:
        raise ValueError("n_instances, n_shards and per_shard must be >= 1")
    root = pathlib.Path(root)
    core, yfcc = root / "core", root / "yfcc"
    rng = np.random.RandomState(seed)
    core_info = _build_core(rng, core, n_instances)
    yfcc_info = _build_yfcc(rng, yfcc, n_shards, per_shard)
    return {
        "core": core,
        "yfcc": yfcc,
        "n_queries": core_info["n_queries"],
        "n_positives": core_info["n_positives"],
        "n_texts": core_info["n_texts"],
        "n_shards": n_shards,
        **yfcc_info,
        "exif_query": core_info["exif_query"],
    }


def write_selected_ids(path, ids: Iterable[str]) -> pathlib.Path:
    """Write one id per line (UTF-8, ``\\n``-terminated) to ``path``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(f"{i}\n" for i in ids).encode("utf-8"))
    return path


if __name__ == "__main__":  # pragma: no cover
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "sample_data")
    info = build_sample(out)
    print(json.dumps({k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in info.items()}, indent=1))


def build_yfcc_like(root, n_images: int = 2000, per_shard: int = 500, seed: int = 0) -> list:
    """Clean YFCC-like shards for benchmarks: real-photo crops at Flickr sizes (500x375, 375x500,
    ...), JPEG quality 75-95, `{key}.jpg` + `{key}.json` per sample. Returns the shard paths."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    photos = {name: _photo(name) for name in _PHOTOS}
    paths = []
    for s in range(-(-n_images // per_shard)):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=_TAR_FORMAT) as tar:
            for j in range(min(per_shard, n_images - s * per_shard)):
                key = f"{s * 1000000 + j:d}"
                photo = photos[_PHOTOS[int(rng.randint(len(_PHOTOS)))]]
                size = _FLICKR_SIZES[int(rng.randint(2))]  # the common 500x375 / 375x500
                data = _jpeg_bytes(_crop_resize(rng, photo, size), int(rng.randint(75, 96)))
                _add_member(tar, f"{key}.jpg", data)
                _add_member(tar, f"{key}.json", json.dumps({"key": key}).encode("utf-8"))
        paths.append(path)
    return paths


# Flickr's common aspect ratios (width:height); a shard of `build_flickr_mix` has 92% of these and a
# tail of any ratio between 1:3 and 3:1, as YFCC100M's photos roughly do.
FLICKR_RATIOS = ((4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (1, 1), (5, 4), (4, 5))
FLICKR_TAIL = 0.08


def flickr_size(rng: np.random.RandomState, long_side: int) -> tuple:
    """(width, height) of one Flickr-like photo whose longer side is `long_side`."""
    if rng.rand() < FLICKR_TAIL:
        r = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
    else:
        w, h = FLICKR_RATIOS[int(rng.randint(len(FLICKR_RATIOS)))]
        r = w / h
    return (long_side, max(1, round(long_side / r))) if r >= 1 else (max(1, round(long_side * r)), long_side)


def build_flickr_mix(root, n_images: int, per_shard: int, long_side: int = 160, seed: int = 0) -> list:
    """Shards of small JPEGs with Flickr's mix of shapes (`flickr_size`), cheap to make and to
    decode: for measuring forward passes and decode concurrency, not features. Returns the paths."""
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    paths = []
    for s in range(-(-n_images // per_shard)):
        path = root / f"{s:05d}.tar"
        with tarfile.open(path, "w", format=_TAR_FORMAT) as tar:
            for j in range(min(per_shard, n_images - s * per_shard)):
                w, h = flickr_size(rng, long_side)
                color = tuple(int(c) for c in rng.randint(0, 256, 3))
                _add_member(tar, f"{s * 1000000 + j:d}.jpg", _jpeg_bytes(Image.new("RGB", (w, h), color), 85))
        paths.append(path)
    return paths
