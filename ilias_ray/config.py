"""Run settings: the reference tool's flags plus ours, validated once, before any Ray work.

Each setting is declared once, as a field of `Config`: its default, its `--flag` help, its choices
or lower bound, and what it decides. The command line (cli.add_extract_flags), the validation of
choices and bounds, the output fingerprint (Config.output_settings) and the settings a file records
of its run (Config.run_settings) are all derived from these declarations.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Optional

from ilias_ray.errors import UserError

PARTITIONS = ("image_queries", "text_queries", "positives", "distractors", "uned")
# The partitions one run may take together (one model load): text queries need the text tower, and
# `uned` is a list of files of its own.
IMAGE_PARTITIONS = ("image_queries", "positives", "distractors")
TRANSFORMS = ("RESIZE_LARGE", "RESIZE_SMALL", "RESIZE_CENTER", "RESIZE_SQUARE", "RESIZE_PAD")
POOLINGS = ("head", "cls", "gap", "mac", "gem", "rmac", "rgem", "local")  # the one list: models/ takes it

# --framework: each framework's module (ilias_ray.models imports it when the framework is used).
# Declared here, not in ilias_ray.models, so that the command line lists them without importing torch.
FRAMEWORKS = {
    "timm": "ilias_ray.models.timm_models",
    "tv": "ilias_ray.models.tv",
    "och": "ilias_ray.models.och",
    "fb": "ilias_ray.models.fb",
    "cvn": "ilias_ray.models.cvn",
    "hier": "ilias_ray.models.hier",
    "unicom": "ilias_ray.models.unicom",
    "unc": "ilias_ray.models.unc",
    "hf": "ilias_ray.models.hf",
    "text": "ilias_ray.models.text",
}

SCALES = (0.707, 1.0, 1.414)
ANGLES = (0, 90, 180, 270)


def bool_flag(value: str) -> bool:
    # Same spellings as the reference's bool_flag.
    v = str(value).lower()
    if v in ("on", "true", "1"):
        return True
    if v in ("off", "false", "0"):
        return False
    raise ValueError(f"invalid value for a boolean flag: {value!r} (use true/false, on/off, 1/0)")


def setting(
    default=MISSING,
    help: str = "",
    *,
    output: bool = False,
    run: bool = False,
    flag: bool = True,
    choices: Optional[tuple] = None,
    minimum: Optional[int] = None,
):
    """A Config field and everything said about it, in one place.

    default: MISSING makes the flag required. help: the `--flag`'s help. output: the setting
    decides the numbers in an output file (it is in the fingerprint; a rerun must match it to
    reuse a file). run: recorded in a file's `run` attribute (where and how it was made, not
    what). flag: False for what validate() fills in. choices, minimum: checked by validate(), and
    choices by argparse too."""
    meta = dict(help=help, output=output, run=run, flag=flag, choices=choices, minimum=minimum)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    dataset_dir: str = setting(help="directory with the images, or with the tar shards", run=True)
    hdf5_dir: str = setting(help="directory for the HDF5 feature files")
    partition: str = setting(
        "image_queries",
        f"which part of ILIAS to embed: one of {', '.join(PARTITIONS)}; or several of "
        f"{', '.join(IMAGE_PARTITIONS)}, comma-separated, as one job with one model load (each still "
        "gets its own files)",
        output=True,
    )
    distractors_dir: Optional[str] = setting(
        None,
        "the folder of the distractors' tar shards, when --partition lists distractors with other "
        "partitions (--dataset_dir is then the ILIAS core folder)",
    )
    hdf5_name: str = setting("features", "base name of the HDF5 files")
    hdf5_compression: int = setting(0, "gzip level for the features dataset (0 = none)")
    overwrite: bool = setting(False, "replace existing feature files")
    framework: str = setting(
        "timm",
        f"model codebase: one of {', '.join(FRAMEWORKS)} (text: the text tower, for --partition text_queries)",
        output=True,
    )
    model: str = setting("vit_large_patch16_siglip_384.webli", "model name in the framework", output=True)
    pooling: str = setting(
        "head", "how a model's features become one vector (local: one per token)", output=True, choices=POOLINGS
    )
    batch_size: int = setting(128, "images per forward pass", run=True, minimum=1)
    webdl_batch_size: int = setting(
        128, "rows per batch sent to a model actor: images of one shape, up to --batch_size", minimum=1
    )
    transforms: str = setting(
        "RESIZE_LARGE", "how an image is resized to --resolution", output=True, choices=TRANSFORMS
    )
    resolution: int = setting(512, "image size the transform resizes to", output=True, minimum=1)
    min_size: int = setting(0, "RESIZE_LARGE: zero-pad each side up to this size", output=True, minimum=0)
    multiscale: bool = setting(
        False, f"average the features of the image at scales {', '.join(map(str, SCALES))}", output=True
    )
    multirotate: bool = setting(
        False, f"average the features of the image rotated by {', '.join(map(str, ANGLES))} degrees", output=True
    )
    masking: bool = setting(False, "zero the pixels outside the query's boxes", output=True)
    crop_resize: bool = setting(False, "crop a query to the union of its boxes before resizing", output=True)
    comp_fp16: bool = setting(True, "fp16 autocast on CUDA (a CPU computes in fp32)", output=True)
    store_fp16: bool = setting(True, "store features as float16 (false: float32)", output=True)
    start_tar: int = setting(0, "first shard (distractors); a multiple of --tar_batch_size", run=True, minimum=0)
    total_tars: Optional[int] = setting(None, "shards to process (default: all remaining)", run=True, minimum=1)
    tar_batch_size: int = setting(10, "shards per distractor HDF5 file", run=True, minimum=1)
    num_workers: int = setting(
        0,
        "decode tasks per model actor, at most (the reference's loader workers per GPU); 0: no cap, every CPU "
        "that a model actor does not take may decode",
        minimum=0,
    )
    selected_ids: Optional[str] = setting(
        None,
        "file or URI with one ID per line (mini-ILIAS, uned); a line may have more comma-separated columns: "
        "only the first one is the ID. For folder partitions an ID is a path below --dataset_dir (no absolute "
        "paths, no '..'); for distractors a tar key or SHARD.tar/KEY",
        run=True,
    )
    # ilias-ray additions
    skip_missing: bool = setting(
        False, "files listed in --selected_ids that do not exist are recorded as skipped instead of failing the run"
    )
    checkpoint: Optional[str] = setting(None, "local weights file in the format the model's hub ships", run=True)
    pretrained: bool = setting(True, "false: seeded random weights, no download (tests and demos)", output=True)
    trust_remote_code: bool = setting(False, "allow torch.hub to run a model repository's code (never by default)")
    address: Optional[str] = setting(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local cluster)")
    model_actors: Optional[int] = setting(
        None,
        "max model actors: the pool grows up to this as nodes join (default: GPUs in the cluster, or one "
        "single-threaded actor per CPU (at most one per 3 GiB of memory) without GPUs)",
        minimum=1,
    )
    sinks: Optional[int] = setting(
        None,
        "sink actors on the driver's node, each writing its share of the output files (output o goes to "
        "sink o mod N); default: one per 16 model actors, at most one per output file",
        minimum=1,
    )
    use_gpu: Optional[bool] = setting(
        None, "auto: GPU actors if the cluster has GPUs now; true: request GPUs even before an autoscaler adds them"
    )
    # Filled in by validate(): digests that identify what made an output.
    checkpoint_sha256: Optional[str] = setting(None, "sha256 of --checkpoint", output=True, flag=False)
    selected_ids_sha256: Optional[str] = setting(None, "sha256 of --selected_ids", output=True, flag=False)

    @staticmethod
    def default(name: str):
        """The declared default of a setting."""
        return Config.__dataclass_fields__[name].default

    def partitions(self) -> tuple:
        """The partitions of --partition, in the order given."""
        return tuple(p.strip() for p in self.partition.split(","))

    def partition_runs(self) -> list:
        """One Config per partition of this run: the run of that partition alone. Its settings,
        fingerprint and `run` record are those of a one-partition run, so that the files of either
        kind of run are the same files (and a later run of either kind resumes or skips them).
        --selected_ids applies to the distractors only; their folder is --distractors_dir."""
        if len(self.partitions()) == 1 and self.distractors_dir is None:
            return [self]
        out = []
        for p in self.partitions():
            tars = p == "distractors"
            out.append(
                replace(
                    self,
                    partition=p,
                    dataset_dir=self.distractors_dir if tars else self.dataset_dir,
                    distractors_dir=None,
                    selected_ids=self.selected_ids if tars else None,
                    selected_ids_sha256=self.selected_ids_sha256 if tars else None,
                )
            )
        return out

    def check_partitions(self) -> None:
        names = self.partitions()
        unknown = [p for p in names if p not in PARTITIONS]
        if unknown:
            raise UserError(f"--partition must be one of {', '.join(PARTITIONS)}, not {unknown[0]!r}")
        self.partition = ",".join(names)  # ' positives' names the file features_positives.hdf5
        if len(names) > 1:
            alone = [p for p in names if p not in IMAGE_PARTITIONS]
            if alone:
                raise UserError(
                    f"--partition {alone[0]} is a run of its own; several partitions in one run are "
                    f"among {', '.join(IMAGE_PARTITIONS)}"
                )
            twice = sorted({p for p in names if names.count(p) > 1})
            if twice:
                raise UserError(f"--partition lists {twice[0]} more than once")
            if "distractors" in names and self.distractors_dir is None:
                raise UserError(
                    "--partition with distractors and other partitions needs --distractors_dir (the folder of "
                    "tar shards); --dataset_dir is the ILIAS core folder"
                )
            if "distractors" not in names and self.selected_ids is not None:
                raise UserError("with several partitions, --selected_ids applies to the distractors only")
        if self.distractors_dir is not None and "distractors" not in names:
            raise UserError("--distractors_dir goes with --partition distractors (alone, or with other partitions)")

    def validate(self) -> "Config":
        self.check_partitions()
        for f in fields(self):  # the declared choices
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{f.name} must be one of {', '.join(choices)}, not {value!r}")
        if (self.framework == "text") != (self.partition == "text_queries"):
            raise UserError("--partition text_queries goes with --framework text (and only it)")
        if self.pooling == "local" and (self.multiscale or self.multirotate):
            raise UserError("--pooling local cannot be averaged over --multiscale/--multirotate views")
        for f in fields(self):  # the declared lower bounds (None: not given)
            low, value = f.metadata["minimum"], getattr(self, f.name)
            if low is not None and value is not None and value < low:
                raise UserError(f"--{f.name} must be {'a positive integer' if low == 1 else f'>= {low}'}")
        if not 0 <= self.hdf5_compression <= 9:
            raise UserError("--hdf5_compression is a gzip level: 0..9")
        if self.start_tar % self.tar_batch_size:
            raise UserError(
                f"--start_tar ({self.start_tar}) must be divisible by --tar_batch_size ({self.tar_batch_size})"
            )
        from ilias_ray.storage.credentials import check_credentials_free
        from ilias_ray.storage.location import Location

        for flag, where in (
            ("--dataset_dir", self.dataset_dir),
            ("--distractors_dir", self.distractors_dir),
            ("--hdf5_dir", self.hdf5_dir),
            ("--checkpoint", self.checkpoint),
            ("--selected_ids", self.selected_ids),
        ):
            check_credentials_free(flag, where)
        Location.of(self.dataset_dir).check_dir("--dataset_dir")
        if self.distractors_dir is not None:
            Location.of(self.distractors_dir).check_dir("--distractors_dir")
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
        """What decides the numbers in an output file (the settings declared output=True); a rerun
        must match these to reuse it. Their names and values are the fingerprint of old files:
        renaming one, or changing how its value is written, makes every finished file stale."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["output"]}

    def run_settings(self) -> dict:
        """Where and how an output was made, not what is in it (the settings declared run=True):
        a file's `run` attribute records them."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["run"]}

    @staticmethod
    def flags() -> list:
        """The declarations of the `ilias-ray extract` flags, in declaration order."""
        return [f for f in fields(Config) if f.metadata["flag"]]
