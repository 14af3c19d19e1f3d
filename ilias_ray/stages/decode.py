"""Stage 2 (CPU): decode, crop to boxes, resize. Ships uint8 HWC pixels of variable shape.

Only decode and resize need the CPU; ToTensor, Normalize, padding, masking and TTA are exact
arithmetic on the uint8 image and run in the model stage (on the GPU when there is one).
A row that fails to decode becomes a SKIP row with the reason, so nothing is lost silently.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ilias_ray.plan_types import Source
from ilias_ray.stages.blocks import per_block
from ilias_ray.stages.rows import DECODE, ROUTING, State, object_column
from ilias_ray.testing import faults

BOX_CLIP = 10000

# Limits on hostile input. A row over one becomes a SKIP row with the reason, decided from sizes
# alone (an image's header, the sizes its transform would make), before anything that large is
# allocated; an ordinary image is never near them, and its pixels are not changed by them.
#
# Image formats opened, by content (a PNG or WebP named .jpg is decoded, as the reference does):
# the benchmark's JPEG and PNG, and the common others Pillow decodes in-process. Never EPS/PS
# (Pillow runs Ghostscript for those) nor any other plugin: `Image.open` tries only these.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (multi-picture JPEG)
# Pixels of a source image: Pillow's own default limit (Image.MAX_IMAGE_PIXELS, about a quarter
# GB as 24-bit RGB), fixed here so that a library that lifts Pillow's global does not lift ours.
# Over it is an error (DecompressionBombError); Pillow itself only warns up to twice its limit.
MAX_SOURCE_PIXELS = 1024 * 1024 * 1024 // 4 // 3  # 89,478,485
# Pixels of the image a transform makes, as a multiple of resolution^2. RESIZE_LARGE/PAD/SQUARE
# never exceed resolution^2; RESIZE_SMALL (and RESIZE_CENTER before its crop) scale the *shorter*
# side to the resolution, so for them this is an aspect-ratio limit of 64:1. A 1x50,000 PNG at
# 512 would be 512x25,600,000 (13 G pixels, 52 GB as Pillow holds RGB). At the limit, decoding a
# 8192x128 JPEG into 512x32,768 (16.8 M pixels) took 0.35 s and 160 MB here; a 4000x3000 one, 0.3 s.
MAX_OUTPUT_AREA = 64
# Nor may the resized image be over MAX_SOURCE_PIXELS (this binds above resolution 1182, where
# 64 x resolution^2 is more). What Pillow allocates on the way does not grow past the output:
# pillow 13 resized 1x170,000 and 2000x40,000 to 512x512 in under 7 MB more than the source.

MAX_TEXT_BYTES = 64 * 1024  # a text query's file; the CLIP tokenizers keep 77 tokens anyway

NO_PIXELS = np.zeros((0, 0, 3), np.uint8)  # rows that are not images
NO_MASK = np.zeros((0, 0), np.uint8)


def large_side_size(w: int, h: int, s: int) -> tuple:
    """LargeSideResize target (width, height)."""
    ar = h / w
    if ar <= 1:
        return s, max(1, int(s * ar))
    return max(1, int(s / ar)), s


def small_side_size(w: int, h: int, s: int) -> tuple:
    """torchvision Resize(s) target (width, height): the shorter side becomes s."""
    if w <= h:
        return s, int(s * h / w)
    return int(s * w / h), s


def transform_sizes(w: int, h: int, transforms: str, resolution: int) -> tuple:
    """(width, height) of the image `resize` makes from a w x h image (for RESIZE_CENTER, the one
    it makes before the crop, which is larger)."""
    if transforms in ("RESIZE_LARGE", "RESIZE_PAD"):
        return large_side_size(w, h, resolution)
    if transforms in ("RESIZE_SMALL", "RESIZE_CENTER"):
        return small_side_size(w, h, resolution)
    if transforms == "RESIZE_SQUARE":
        return resolution, resolution
    raise ValueError(f"unknown transforms {transforms!r}")


class ImageTooLarge(ValueError):
    """An image over one of the size limits above; raised before anything that size exists."""


def check_source(w: int, h: int) -> None:
    if w * h > MAX_SOURCE_PIXELS:
        raise Image.DecompressionBombError(
            f"Image size ({w * h} pixels) exceeds limit of {MAX_SOURCE_PIXELS} pixels, "
            "could be decompression bomb DOS attack."
        )


def check_resize(w: int, h: int, transforms: str, resolution: int) -> None:
    """Raise ImageTooLarge if the transform would make an image over the limits from a w x h one."""
    ow, oh = transform_sizes(w, h, transforms, resolution)
    limit = MAX_OUTPUT_AREA * resolution * resolution
    what = f"{MAX_OUTPUT_AREA} x {resolution}^2 = {limit}"
    if limit > MAX_SOURCE_PIXELS:
        limit, what = MAX_SOURCE_PIXELS, f"{MAX_SOURCE_PIXELS} (Pillow's limit)"
    if ow * oh > limit:
        raise ImageTooLarge(
            f"{transforms} at resolution {resolution} makes {w}x{h} into {ow}x{oh} ({ow * oh} pixels), over {what}"
        )


def pad_target(transforms: str, resolution: int, min_size: int) -> int:
    """The CenterPadding size of a transform (0 = none)."""
    if transforms == "RESIZE_LARGE":
        return min_size
    if transforms == "RESIZE_PAD":
        return resolution
    return 0


def resize(img: Image.Image, transforms: str, resolution: int) -> Image.Image:
    if transforms in ("RESIZE_LARGE", "RESIZE_PAD"):
        return img.resize(large_side_size(img.width, img.height, resolution))  # Pillow default: bicubic
    # torch is imported here, not above: decode workers of the default transform never load it.
    import torchvision.transforms.functional as TF

    if transforms == "RESIZE_SMALL":
        return TF.resize(img, resolution)
    if transforms == "RESIZE_CENTER":
        return TF.center_crop(TF.resize(img, resolution), resolution)
    if transforms == "RESIZE_SQUARE":
        return TF.resize(img, [resolution, resolution])
    raise ValueError(f"unknown transforms {transforms!r}")


def box_union(boxes: list) -> tuple:
    clip = lambda v: min(max(v, 0), BOX_CLIP)  # noqa: E731
    return (
        clip(min(b[0] for b in boxes)),
        clip(min(b[1] for b in boxes)),
        clip(max(b[0] + b[2] for b in boxes)),
        clip(max(b[1] + b[3] for b in boxes)),
    )


def box_mask(w: int, h: int, boxes: list, origin=(0, 0)) -> np.ndarray:
    """uint8 (h, w) mask, 1 inside any box; boxes in pixels of the image before `origin` crop."""
    m = np.zeros((h, w), np.uint8)
    for x, y, bw, bh in boxes:
        x0, y0 = int(x) - origin[0], int(y) - origin[1]
        m[max(y0, 0) : max(y0 + int(bh), 0), max(x0, 0) : max(x0 + int(bw), 0)] = 1
    return m


def resize_mask(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize, as torch's interpolate does it on the tensor."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(mask)[None, None].float()
    return F.interpolate(t, size=(h, w), mode="nearest")[0, 0].to(torch.uint8).numpy()


def padded(h: int, w: int, m: int) -> tuple:
    return max(h, m), max(w, m)


def open_image(data: bytes) -> Image.Image:
    """The image, not yet decoded (Image.open reads the header only), in one of FORMATS and within
    MAX_SOURCE_PIXELS."""
    with warnings.catch_warnings():
        # Pillow warns between its limit and twice it; ours is an error at once, checked below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    check_source(img.width, img.height)
    return img


def decode_image(data: bytes, exif: bool) -> Image.Image:
    img = open_image(data).convert("RGB")
    if exif:
        img = ImageOps.exif_transpose(img)
    return img


@dataclass(frozen=True)
class Decoder:
    """What the decode stage needs of the run's settings, and nothing else (a decode task gets
    this, not the whole Config). The transform and its padding size decide the model stage's
    input too: Embedder takes `pad` from here."""

    transforms: str
    resolution: int
    min_size: int
    crop_resize: bool
    masking: bool

    @property
    def pad(self) -> int:
        """The CenterPadding size of the transform (0 = none)."""
        return pad_target(self.transforms, self.resolution, self.min_size)

    def group_key(self, data: bytes, source: int, boxes: str):
        """What the read stage groups a row as read by (stages/grouper.py): the shape decoding will
        give an image (`output_shape`), or one key for all texts."""
        if source == Source.TEXT:
            return ("text",)
        return output_shape(bytes(data), source == Source.FOLDER, json.loads(boxes) if boxes else None, self)


def prepare(data: bytes, exif: bool, boxes: list, dec: Decoder):
    """Decoded, cropped and resized uint8 HWC array, plus the mask (uint8 HW or None)."""
    img = decode_image(data, exif)
    origin = (0, 0)
    if boxes and dec.crop_resize:
        x0, y0, x1, y1 = box_union(boxes)
        if (x1 - x0) * (y1 - y0) > MAX_SOURCE_PIXELS:  # boxes past the image's edges crop larger
            raise ImageTooLarge(
                f"the boxes' union {x1 - x0}x{y1 - y0} is over {MAX_SOURCE_PIXELS} pixels (Pillow's limit)"
            )
        img = img.crop((x0, y0, x1, y1))
        origin = (x0, y0)
    check_resize(img.width, img.height, dec.transforms, dec.resolution)
    out = resize(img, dec.transforms, dec.resolution)
    arr = np.asarray(out, dtype=np.uint8)
    mask = None
    if boxes and dec.masking:
        th, tw = padded(arr.shape[0], arr.shape[1], dec.pad)
        # Boxes are in original pixels; with --crop_resize they shift by the crop origin.
        mask = resize_mask(box_mask(img.width, img.height, boxes, origin), th, tw)
    return arr, mask


EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that exif_transpose turns by 90 degrees


def output_shape(data: bytes, exif: bool, boxes, dec: Decoder):
    """(height, width, masked) of what `prepare` will make of these bytes, read from the image's
    header alone (Image.open decodes no pixels), or None when the header does not tell. The read
    stage groups rows by it so that the model stage gets whole batches of one shape: a hint, never
    a promise (the model stage groups by the decoded shape itself)."""
    try:
        img = open_image(data)
        w, h = img.size
        if exif and img.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
            w, h = h, w
        if boxes and dec.crop_resize:
            x0, y0, x1, y1 = box_union(boxes)
            w, h = x1 - x0, y1 - y0
        if dec.transforms in ("RESIZE_CENTER", "RESIZE_SQUARE"):
            tw = th = dec.resolution
        else:
            tw, th = transform_sizes(w, h, dec.transforms, dec.resolution)
    except Exception:  # noqa: BLE001 - a bad header is the decode stage's to record, not ours
        return None
    return th, tw, bool(boxes and dec.masking)


def skip_reason(e: Exception) -> str:
    """The recorded reason of a failed decode; the same on every run (no object addresses)."""
    return f"decode failed: {type(e).__name__}: {re.sub(r' <[^<>]* at 0x[0-9a-fA-F]+>', '', str(e))}"


def text_problem(raw: bytes):
    """Why a text query cannot be embedded, or None. The model stage decodes it as UTF-8."""
    if len(raw) > MAX_TEXT_BYTES:
        return f"text too large: {len(raw)} bytes, over {MAX_TEXT_BYTES}"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"text is not valid UTF-8: {e}"
    return None


def decode_batch(batch: dict, dec: Decoder) -> dict:
    """Ray Data map_batches function: image rows as read -> PIXELS, or SKIPPED (with the reason);
    text rows pass on as they are (the model stage tokenizes them), or become SKIPPED if they are
    not valid UTF-8 or too large; other rows pass on."""
    DECODE.check(batch)
    t0 = time.time()
    n = len(batch["seq"])
    states = batch["state"].copy()
    reasons = list(batch["reason"])
    data = list(batch["data"])
    # Pixels travel as numpy arrays: Ray stores them as one variable-shaped tensor column,
    # a single copy into Arrow and zero-copy views on the model side (bytes cost 7x more).
    img = object_column([NO_PIXELS] * n)
    mask = object_column([NO_MASK] * n)
    for i in range(n):
        if states[i] != State.BYTES:
            continue
        source = batch["source"][i]
        if source == Source.TEXT:
            why = text_problem(bytes(data[i]))
            if why is not None:
                states[i], reasons[i], data[i] = State.SKIPPED, why, b""
            continue
        boxes = json.loads(batch["boxes"][i]) if batch["boxes"][i] else None
        faults.hit("decode")  # tests: ILIAS_RAY_FAULT=decode:slow=MS, per image
        try:
            arr, m = prepare(data[i], source == Source.FOLDER, boxes, dec)
        except Exception as e:  # any decode failure is recorded, not raised
            states[i], reasons[i] = State.SKIPPED, skip_reason(e)
        else:
            states[i] = State.PIXELS
            img[i] = arr
            if m is not None:
                mask[i] = m
        data[i] = b""  # the raw bytes stop here
    faults.trace("decode", t0=t0, t1=time.time(), rows=n, pid=os.getpid())
    out = {k: batch[k] for k in ROUTING}
    out.update(state=states, reason=np.array(reasons, dtype=object), data=np.array(data, dtype=object))
    out.update(img=img, mask=mask)
    return out


def decode_blocks(batch: dict, dec) -> dict:
    """The decode stage (decode_batch) on packed blocks (stages/blocks.py)."""
    return per_block(decode_batch, batch, dec=dec)
