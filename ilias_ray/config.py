"""Run settings: the reference tool's flags plus ours, validated once, before any Ray work."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

PARTITIONS = ("image_queries", "text_queries", "positives", "distractors", "uned")
TRANSFORMS = ("RESIZE_LARGE", "RESIZE_SMALL", "RESIZE_CENTER", "RESIZE_SQUARE", "RESIZE_PAD")
POOLINGS = ("head", "cls", "gap", "mac", "gem", "rmac", "rgem", "local")

SCALES = (0.707, 1.0, 1.414)
ANGLES = (0, 90, 180, 270)


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line and exits non-zero."""


def bool_flag(value: str) -> bool:
    # Same spellings as the reference's bool_flag.
    v = str(value).lower()
    if v in ("on", "true", "1"):
        return True
    if v in ("off", "false", "0"):
        return False
    raise ValueError(f"invalid value for a boolean flag: {value!r} (use true/false, on/off, 1/0)")


@dataclass
class Config:
    dataset_dir: str
    hdf5_dir: str
    partition: str = "image_queries"
    hdf5_name: str = "features"
    hdf5_compression: int = 0
    overwrite: bool = False
    framework: str = "timm"
    model: str = "vit_large_patch16_siglip_384.webli"
    pooling: str = "head"
    batch_size: int = 128
    webdl_batch_size: int = 128
    transforms: str = "RESIZE_LARGE"
    resolution: int = 512
    min_size: int = 0
    multiscale: bool = False
    multirotate: bool = False
    masking: bool = False
    crop_resize: bool = False
    comp_fp16: bool = True
    store_fp16: bool = True
    start_tar: int = 0
    total_tars: Optional[int] = None
    tar_batch_size: int = 10
    num_workers: int = 8
    selected_ids: Optional[str] = None
    # ilias-ray additions
    skip_missing: bool = False  # listed files that do not exist become recorded skips
    checkpoint: Optional[str] = None
    pretrained: bool = True
    trust_remote_code: bool = False
    address: Optional[str] = None
    model_actors: Optional[int] = None
    use_gpu: Optional[bool] = None  # None: GPU actors when the cluster has GPUs
    # Filled in by validate(): digests that identify what made an output.
    checkpoint_sha256: Optional[str] = field(default=None)
    selected_ids_sha256: Optional[str] = field(default=None)

    def validate(self) -> "Config":
        if self.partition not in PARTITIONS:
            raise UserError(f"--partition must be one of {', '.join(PARTITIONS)}, not {self.partition!r}")
        if self.transforms not in TRANSFORMS:
            raise UserError(f"--transforms must be one of {', '.join(TRANSFORMS)}, not {self.transforms!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"--pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if (self.framework == "text") != (self.partition == "text_queries"):
            raise UserError("--partition text_queries goes with --framework text (and only it)")
        if self.pooling == "local" and (self.multiscale or self.multirotate):
            raise UserError("--pooling local cannot be averaged over --multiscale/--multirotate views")
        for name in ("resolution", "batch_size", "tar_batch_size", "webdl_batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be a positive integer")
        for name in ("min_size", "start_tar", "num_workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0")
        if self.total_tars is not None and self.total_tars < 1:
            raise UserError("--total_tars must be a positive integer")
        if not 0 <= self.hdf5_compression <= 9:
            raise UserError("--hdf5_compression is a gzip level: 0..9")
        if self.start_tar % self.tar_batch_size:
            raise UserError(
                f"--start_tar ({self.start_tar}) must be divisible by --tar_batch_size ({self.tar_batch_size})"
            )
        if self.model_actors is not None and self.model_actors < 1:
            raise UserError("--model_actors must be a positive integer")
        from ilias_ray.storage import Location, check_credentials_free

        for flag, where in (("--dataset_dir", self.dataset_dir), ("--hdf5_dir", self.hdf5_dir),
                            ("--checkpoint", self.checkpoint), ("--selected_ids", self.selected_ids)):
            check_credentials_free(flag, where)
        Location.of(self.dataset_dir).check_dir("--dataset_dir")
        if self.checkpoint is not None:
            ckpt = Location.of(self.checkpoint)
            ckpt.check_file("--checkpoint")
            self.checkpoint_sha256 = ckpt.sha256()
        if self.selected_ids is not None:
            ids = Location.of(self.selected_ids)
            ids.check_file("--selected_ids")
            self.selected_ids_sha256 = ids.sha256()
        if self.partition == "uned" and self.selected_ids is None:
            raise UserError("--partition uned needs --selected_ids (the list of files to embed)")
        return self

    def output_settings(self) -> dict:
        """What decides the numbers in an output file; a rerun must match these to reuse it."""
        keys = [
            "partition", "framework", "model", "pooling", "transforms", "resolution", "min_size",
            "multiscale", "multirotate", "masking", "crop_resize", "comp_fp16", "store_fp16",
            "checkpoint_sha256", "pretrained", "selected_ids_sha256",
        ]
        return {k: getattr(self, k) for k in keys}


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
