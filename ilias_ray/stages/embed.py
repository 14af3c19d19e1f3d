"""Stage 3 (GPU or CPU actor pool): uint8 pixels -> normalised, padded, pooled features.

Rows are grouped by image shape and run in sub-batches of up to `--batch_size`; images are
never padded or cropped to share a batch, because that would change their features.
Rows with features leave as FEATURES, with `feat` a (vectors, dim) array; SKIPPED and END
rows pass through untouched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from ilias_ray.errors import UserError
from ilias_ray.models.pooling import pool
from ilias_ray.models.registry import build
from ilias_ray.plan_types import Source
from ilias_ray.stages.blocks import PACKED, per_block
from ilias_ray.stages.rows import EMBED, NO_FEATURES, ROUTING, State, object_column
from ilias_ray.storage.cache import local_copy
from ilias_ray.testing import faults

CPU_CHUNK_PIXELS = 1 << 19  # two 512x384 images


def center_pad(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Zero-pad a (b, c, H, W) tensor to at least (h, w); the extra splits left = pad // 2."""
    ph, pw = max(h - x.shape[-2], 0), max(w - x.shape[-1], 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def pad_to_multiple(x: torch.Tensor, m: int) -> torch.Tensor:
    if m <= 0:
        return x
    h, w = x.shape[-2:]
    return center_pad(x, h + (-h) % m, w + (-w) % m)


KV_PREFIX = "ilias_ray:batch:"  # + actor id: the batch an actor is working on (GCS key-value store)


def describe(batch: dict) -> str:
    """'00003.tar positions 128-191' (one part per unit of the batch): where its rows come from."""
    spans = []
    for uid in np.unique(batch["unit"]):
        rows = np.nonzero(batch["unit"] == uid)[0]
        tar = next((str(batch["id"][i]) for i in rows if ".tar/" in str(batch["id"][i])), "")
        unit = tar.split("/")[0] if tar else f"unit {int(uid)}"
        pos = batch["pos"][rows]
        spans.append(f"{unit} positions {int(pos.min())}-{int(pos.max())}")
    return ", ".join(spans)


def note_batch(batch: dict) -> None:
    """Record, under this actor's id, the batch it is about to run: if it kills the actor every
    time, the driver can say which rows did it (the actor itself is gone by then)."""
    import ray
    from ray.experimental import internal_kv

    if ray.is_initialized() and internal_kv._internal_kv_initialized():
        actor = ray.get_runtime_context().get_actor_id()
        if actor:
            internal_kv._internal_kv_put(KV_PREFIX + actor, describe(batch))


def batch_in_flight(actor_id: str):
    """On the driver: what note_batch recorded for that actor, or None."""
    from ray.experimental import internal_kv

    got = internal_kv._internal_kv_get(KV_PREFIX + actor_id) if internal_kv._internal_kv_initialized() else None
    return got.decode() if got else None


@dataclass(frozen=True)
class BackboneSpec:
    """Which model a model actor builds, and from which weights: what `ilias_ray.models.build`
    needs of the run's settings, and nothing else."""

    framework: str
    model: str
    checkpoint: Optional[str]  # a local path or a URI; None: the hub's weights (or random ones)
    checkpoint_sha256: Optional[str]  # the --checkpoint's digest, checked on each node's copy
    pretrained: bool
    trust_remote_code: bool


class Embedder:
    """Ray Data callable class: one instance per actor, the model loaded once.

    It is given only what the model stage needs (job/stage_args.embedder_args makes it from a Config):
    the backbone; the pooling; the test-time views (scales and angles, (1.0,) and (0,) for none),
    whose features are averaged; the CenterPadding size of the transform (0 = none); the images
    per forward pass; fp16 autocast (on CUDA only) and the stored dtype."""

    def __init__(
        self,
        backbone: BackboneSpec,
        *,
        pooling: str,
        scales: tuple,
        angles: tuple,
        pad: int,
        batch_size: int,
        comp_fp16: bool,
        store_fp16: bool,
        threads: int = 0,
    ):
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A --checkpoint in a bucket is downloaded once per node (and checked against its sha256).
        b = backbone
        self.bb = build(
            b.framework,
            b.model,
            checkpoint=local_copy(b.checkpoint, b.checkpoint_sha256) if b.checkpoint else None,
            pretrained=b.pretrained,
            trust_remote_code=b.trust_remote_code,
        )
        self.bb.model.to(self.device)
        if threads and self.device.type == "cpu":
            torch.set_num_threads(threads)
        # Channels-last: CNNs on a GPU (fp16 tensor cores want NHWC); a ViT has one conv, its stem.
        # On this project's CPU it did not pay once images go in small chunks (bench/throughput.py --variants).
        cnn = sum(isinstance(m, torch.nn.Conv2d) for m in self.bb.model.modules()) > 1
        self.set_channels_last(cnn and self.device.type == "cuda")
        self.mean = torch.tensor(self.bb.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.bb.std, device=self.device).view(1, 3, 1, 1)
        self.scale = 1 / (255 * self.std)
        self.shift = -self.mean / self.std
        self.chunk_pixels = CPU_CHUNK_PIXELS
        self.pad = pad
        self.scales = tuple(scales)
        self.angles = tuple(angles)
        # The reference computes in fp32 on a CPU; autocast only applies on CUDA.
        self.autocast = self.device.type == "cuda" and comp_fp16
        self.out_dtype = np.float16 if store_fp16 else np.float32
        self.fits = {}  # (h, w) -> the batch size that fit after an out-of-memory error

    def set_channels_last(self, on: bool) -> None:
        self.channels_last = on
        self.bb.model.to(memory_format=torch.channels_last if on else torch.contiguous_format)

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_to_multiple(x, self.bb.patch)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            if self.pooling == "head":
                f = self.bb.head(x)
            else:
                f = pool(self.pooling, self.bb.features(x), self.bb.token_pool)
        return F.normalize(f.float(), dim=-1)

    def chunk(self, hw) -> int:
        """Images per forward pass. On a CPU, small chunks keep activations in cache: at 512 px,
        2 images per pass ran 1.1-1.8x faster than 32 on the 2-core CI machine (bench/throughput.py
        --variants); a GPU takes the whole batch."""
        if self.device.type != "cpu":
            return 1 << 30
        return max(1, self.chunk_pixels // (hw[0] * hw[1]))

    @torch.inference_mode()
    def embed_pixels(self, pixels: torch.Tensor, mask=None) -> torch.Tensor:
        """(b, H, W, 3) uint8 -> (b, D) (or (b, n, D) for local) L2-normalised float32."""
        faults.hit("forward", n=len(pixels))  # tests: ILIAS_RAY_FAULT=forward:oom>N
        m = self.chunk(pixels.shape[1:3])
        if len(pixels) > m:
            return torch.cat(
                [
                    self.embed_pixels(pixels[i : i + m], None if mask is None else mask[i : i + m])
                    for i in range(0, len(pixels), m)
                ]
            )
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.mul_(self.scale).add_(self.shift)  # == (x / 255 - mean) / std, one pass
        x = center_pad(x, self.pad, self.pad)
        if mask is not None:
            x = x * mask.to(self.device)[:, None].float()
        views = []
        for s in self.scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bicubic", align_corners=False)
            for a in self.angles:
                xr = xs if a == 0 else TF.rotate(xs, a, interpolation=InterpolationMode.BILINEAR)
                views.append(self.forward(xr))
        if len(views) == 1:
            return views[0]
        return F.normalize(torch.stack(views).mean(0), dim=-1)

    @torch.inference_mode()
    def embed_texts(self, texts: list) -> torch.Tensor:
        tokens = self.bb.tokenizer(texts).to(self.device)
        with self._autocast():
            f = self.bb.model.encode_text(tokens)
        return F.normalize(f.float(), dim=-1)

    def __call__(self, batch: dict) -> dict:
        # A failed batch is retried once here (a flaky library or device hiccup); a second failure
        # fails the job with its error. A crashed actor is restarted by Ray and its batch resent;
        # either way the sink keeps exactly one copy of each row.
        if PACKED in batch:  # blocks kept whole between the stages (stages/blocks.py)
            return per_block(self.embed_block, batch)
        return self.embed_block(batch)

    def embed_block(self, batch: dict) -> dict:
        """One block's rows (never `self(...)` from here: Ray Data runs __call__ on one thread of
        its own, and a call back into it would wait for itself)."""
        EMBED.check(batch)
        note_batch(batch)
        try:
            faults.hit("embed")
            return self.embed_batch(batch)
        except (torch.OutOfMemoryError, UserError):
            raise
        except Exception as e:
            print(f"ilias-ray: model batch failed ({type(e).__name__}: {e}); retrying it once", flush=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return self.embed_batch(batch)

    def embed_batch(self, batch: dict) -> dict:
        n = len(batch["seq"])
        feats = [NO_FEATURES] * n
        states = batch["state"].copy()
        bs = self.batch_size

        def store(rows, f):
            f = f.cpu().numpy().astype(self.out_dtype)
            for i, v in zip(rows, f):
                feats[i] = v.reshape(-1, v.shape[-1])  # (vectors, dim): one, or one per token
                states[i] = State.FEATURES

        text_rows = np.nonzero((batch["source"] == Source.TEXT) & (states == State.BYTES))[0]
        for a in range(0, len(text_rows), bs):
            rows = text_rows[a : a + bs]
            faults.trace("forward", h=0, w=0, rows=len(rows))
            store(rows, self.embed_texts([bytes(batch["data"][i]).decode("utf-8").strip() for i in rows]))

        groups = defaultdict(list)
        for i in np.nonzero(states == State.PIXELS)[0]:
            h, w = batch["img"][i].shape[:2]
            groups[(h, w, batch["mask"][i].size > 0)].append(i)
        for (h, w, has_mask), rows in groups.items():
            a = 0
            while a < len(rows):
                size = self.fits.get((h, w), bs)
                sub = rows[a : a + size]
                pixels = np.stack([batch["img"][i] for i in sub])
                mask = None
                if has_mask:
                    mask = torch.from_numpy(np.stack([batch["mask"][i] for i in sub]))
                try:
                    faults.trace("forward", h=h, w=w, rows=len(sub))
                    f = self.embed_pixels(torch.from_numpy(pixels), mask)
                except torch.OutOfMemoryError:
                    if len(sub) == 1:
                        raise  # one image does not fit: nothing smaller to try
                    # Halve this shape's batch and retry; remember what fits for the next batches.
                    self.fits[(h, w)] = max(1, len(sub) // 2)
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                store(sub, f)
                a += len(sub)

        out = {k: batch[k] for k in ROUTING}
        out["state"] = states
        out["feat"] = object_column(feats)
        return out
