"""What a finished output is: its files' names, the HDF5 schema (declared once here), the
settings it records and their fingerprint, and the status of an existing output.

`verify` checks files against DATASETS and ATTRS; `output_status` reads them to skip or refuse an
existing output; the parts store and the commit step write them."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import h5py
import numpy as np
import pyarrow.fs as pafs

from ilias_ray.storage.location import Location

SUFFIX = ".hdf5"
PARTIAL_SUFFIX = ".partial"
ASCII = h5py.string_dtype("ascii")
UTF8 = h5py.string_dtype("utf-8")


FEATURE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Field:
    """One dataset of an output file. `dtype`: "features" (the run's dtype, one of FEATURE_DTYPES),
    "int64", "ascii" or "utf-8" (variable-length strings); `per_token`: only with --pooling local;
    `since_0_1`: added during 0.1, so files of earlier builds lack it."""

    name: str
    dtype: str
    doc: str
    per_token: bool = False
    since_0_1: bool = False  # older ilias-ray files may lack it: its absence is a warning, not a problem


FEATURES = Field("features", "features", "vectors, L2-normalised, one per row (N x dim); (0, 0) when none")
INDEX = Field("index", "ascii", "row IDs, in input order")
OFFSETS = Field("offsets", "int64", "row i's vectors are features[offsets[i]:offsets[i + 1]]", per_token=True)
SKIPPED_INDEX = Field("skipped_index", "ascii", "IDs of inputs that have no row")
SKIPPED_REASON = Field("skipped_reason", "utf-8", "why, one per skipped_index entry")
DUPLICATE_INDEX = Field(
    "duplicate_index", "ascii", "IDs the input holds more than once (each occurrence has a row)", since_0_1=True
)
DATASETS = (FEATURES, INDEX, OFFSETS, SKIPPED_INDEX, SKIPPED_REASON, DUPLICATE_INDEX)

# Attributes: the settings (JSON, and their fingerprint), the run's own flags (JSON), library
# versions (JSON), per-unit ends (JSON list of {name, rows, end}), counts, and `complete`.
A_SETTINGS, A_FINGERPRINT, A_RUN, A_VERSIONS, A_UNITS = "ilias_ray_settings", "fingerprint", "run", "versions", "units"
A_ROWS, A_SKIPPED, A_DROPPED, A_DUPLICATES = "num_rows", "num_skipped", "duplicates_dropped", "num_input_duplicates"
A_COMPLETE = "complete"
ATTRS = (A_SETTINGS, A_FINGERPRINT, A_RUN, A_VERSIONS, A_UNITS, A_ROWS, A_SKIPPED, A_DROPPED, A_DUPLICATES, A_COMPLETE)
ATTRS_SINCE_0_1 = (A_DUPLICATES,)  # added during 0.1: files of earlier builds lack them (a warning in verify)


def dtype_matches(field: Field, dtype) -> bool:
    """Whether a dataset's dtype is the one `field` declares."""
    if field.dtype == "features":
        return str(dtype) in FEATURE_DTYPES
    if field.dtype in ("ascii", "utf-8"):
        info = h5py.check_string_dtype(dtype)
        return info is not None and info.encoding == field.dtype
    return np.dtype(dtype) == np.dtype(field.dtype)


def partial_path(out_dir: Location, name: str) -> str:
    """The local file an output is built in before it is published."""
    return os.path.join(out_dir.staging(), name + PARTIAL_SUFFIX)


def unfinished(name: str) -> bool:
    """A listing entry that an unfinished run left (an output's partial file or parts folder)."""
    return name.endswith((SUFFIX + PARTIAL_SUFFIX, SUFFIX + PARTS_SUFFIX))


def output_status(loc: Location, settings: dict) -> tuple:
    """('missing' | 'same' | a one-line description of how an existing output differs, the
    library versions it records)."""
    if loc.info().type == pafs.FileType.NotFound:
        return "missing", {}
    try:
        with loc.open_hdf5() as f:
            recorded = f.attrs.get(A_SETTINGS)
            complete = bool(f.attrs.get(A_COMPLETE, False))
            versions = json.loads(f.attrs.get(A_VERSIONS, "{}"))
    except (OSError, ValueError):
        return "it is not a readable HDF5 file", {}
    if recorded is None or not complete:
        return "it records no ilias-ray settings (made by another tool?)", versions
    old = json.loads(recorded)
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    return ("same" if not diff else "settings differ (" + "; ".join(diff) + ")"), versions


PARTS_SUFFIX = ".parts"


def fingerprint(settings: dict) -> str:
    """The settings' identity: parts and files made with other settings never pass for these."""
    return hashlib.sha256(settings_json(settings).encode()).hexdigest()


def parts_location(out_dir: Location, name: str) -> Location:
    """Where an output's finished units live until the output is assembled (`NAME.hdf5.parts/`)."""
    return out_dir / (name + PARTS_SUFFIX)


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True)


def library_versions() -> dict:
    """The versions of what computes the numbers; every output file records them."""
    import importlib.metadata as md

    from ilias_ray import __version__

    out = {"ilias_ray": __version__}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "ray", "h5py", "pillow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
