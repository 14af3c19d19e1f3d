"""Stage 2 (CPU): decode, crop to boxes, resize. Ships uint8 HWC pixels of variable shape.

Only decode and resize need the CPU; ToTensor, Normalize, padding, masking and TTA are exact
arithmetic on the uint8 image and run in the model stage (on the GPU when there is one).
A row that fails to decode becomes a SKIP row with the reason, so nothing is lost silently.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
from PIL import Image, ImageOps

from ilias_ray.read import FILE_IMAGE, IMAGE, SKIP, TAR_IMAGE

BOX_CLIP = 10000
NO_PIXELS = np.zeros((0, 0, 3), np.uint8)  # rows that are not images
NO_MASK = np.zeros((0, 0), np.uint8)


def large_side_size(w: int, h: int, s: int) -> tuple:
    """LargeSideResize target (width, height)."""
    ar = h / w
    if ar <= 1:
        return s, max(1, int(s * ar))
    return max(1, int(s / ar)), s


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


def decode_image(data: bytes, exif: bool) -> Image.Image:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if exif:
        img = ImageOps.exif_transpose(img)
    return img


def prepare(data: bytes, exif: bool, boxes: list, cfg: dict):
    """Decoded, cropped and resized uint8 HWC array, plus the mask (uint8 HW or None)."""
    img = decode_image(data, exif)
    origin = (0, 0)
    if boxes and cfg["crop_resize"]:
        x0, y0, x1, y1 = box_union(boxes)
        img = img.crop((x0, y0, x1, y1))
        origin = (x0, y0)
    out = resize(img, cfg["transforms"], cfg["resolution"])
    arr = np.asarray(out, dtype=np.uint8)
    mask = None
    if boxes and cfg["masking"]:
        th, tw = padded(arr.shape[0], arr.shape[1], pad_target(cfg["transforms"], cfg["resolution"], cfg["min_size"]))
        # Boxes are in original pixels; with --crop_resize they shift by the crop origin.
        mask = resize_mask(box_mask(img.width, img.height, boxes, origin), th, tw)
    return arr, mask


def object_column(items: list) -> np.ndarray:
    """A 1-D object array of `items` (np.array would try to stack equal-shaped arrays)."""
    col = np.empty(len(items), dtype=object)
    col[:] = items
    return col


def skip_reason(e: Exception) -> str:
    """The recorded reason of a failed decode; the same on every run (no object addresses)."""
    return f"decode failed: {type(e).__name__}: {re.sub(r' <[^<>]* at 0x[0-9a-fA-F]+>', '', str(e))}"


def decode_batch(batch: dict, cfg: dict) -> dict:
    """Ray Data map_batches function: image rows -> IMAGE (pixels) or SKIP (reason)."""
    n = len(batch["seq"])
    kinds = batch["kind"].copy()
    notes = list(batch["note"])
    data = list(batch["data"])
    # Pixels travel as numpy arrays: Ray stores them as one variable-shaped tensor column,
    # a single copy into Arrow and zero-copy views on the model side (bytes cost 7x more).
    img = object_column([NO_PIXELS] * n)
    mask = object_column([NO_MASK] * n)
    h = np.zeros(n, np.int32)
    w = np.zeros(n, np.int32)
    for i in range(n):
        k = kinds[i]
        if k not in (TAR_IMAGE, FILE_IMAGE):
            continue
        boxes = json.loads(batch["boxes"][i]) if batch["boxes"][i] else None
        try:
            arr, m = prepare(data[i], k == FILE_IMAGE, boxes, cfg)
        except Exception as e:  # any decode failure is recorded, not raised
            kinds[i], notes[i] = SKIP, skip_reason(e)
        else:
            kinds[i] = IMAGE
            img[i] = arr
            h[i], w[i] = arr.shape[:2]
            if m is not None:
                mask[i] = m
        data[i] = b""  # the raw bytes stop here
    return {
        "seq": batch["seq"],
        "out": batch["out"],
        "unit": batch["unit"],
        "pos": batch["pos"],
        "id": batch["id"],
        "kind": kinds,
        "note": np.array(notes, dtype=object),
        "off": batch["off"],
        "data": np.array(data, dtype=object),
        "img": img,
        "h": h,
        "w": w,
        "mask": mask,
    }
