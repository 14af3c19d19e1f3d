"""The HDF5 output: what a finished file holds (its schema, declared once here), and the commit
step that builds it from the parts store.

A file appears under its final name only complete: the parts are copied, in unit order, into a
local `NAME.hdf5.partial` (in --hdf5_dir, or in the staging folder for a bucket), which is then
fsynced and published (a rename and an fsync of the directory, or an upload) as `NAME.hdf5`.
`verify` checks files against DATASETS and ATTRS; `output_status` reads them to skip or refuse
an existing output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

import h5py
import numpy as np
import pyarrow.fs as pafs

from ilias_ray import faults
from ilias_ray.config import settings_json
from ilias_ray.parts import PARTS_SUFFIX, PartsStore, fingerprint
from ilias_ray.storage import Location

SUFFIX = ".hdf5"
PARTIAL_SUFFIX = ".partial"
ASCII = h5py.string_dtype("ascii")
UTF8 = h5py.string_dtype("utf-8")
CHUNK_BYTES = 1 << 20  # features are chunked in about 1 MiB (at 4 bytes a value), at most 1024 rows
FEATURE_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class Field:
    """One dataset of an output file. `kind`: "features" (the run's dtype, one of FEATURE_DTYPES),
    "int64", "ascii" or "utf-8" (variable-length strings); `local`: only with --pooling local;
    `since_0_1`: added during 0.1, so files of earlier builds lack it."""

    name: str
    kind: str
    doc: str
    local: bool = False
    since_0_1: bool = False  # older ilias-ray files may lack it: its absence is a warning, not a problem


FEATURES = Field("features", "features", "vectors, L2-normalised, one per row (N x dim); (0, 0) when none")
INDEX = Field("index", "ascii", "row IDs, in input order")
OFFSETS = Field("offsets", "int64", "row i's vectors are features[offsets[i]:offsets[i + 1]]", local=True)
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


def kind_matches(field: Field, dtype) -> bool:
    """Whether a dataset's dtype is the one `field` declares."""
    if field.kind == "features":
        return str(dtype) in FEATURE_DTYPES
    if field.kind in ("ascii", "utf-8"):
        info = h5py.check_string_dtype(dtype)
        return info is not None and info.encoding == field.kind
    return np.dtype(dtype) == np.dtype(field.kind)


@dataclass(frozen=True)
class UnitSpec:
    """One unit of an output, as the sink and the assembly see it."""

    uid: int
    name: str  # shard file name, or the partition for folder units
    count: Optional[int]  # rows owed, when known before reading (folders); tars: from the shard's marker
    size: int  # tar size in bytes (progress), 0 for folder units
    record: Optional[dict] = None  # completion record of an earlier run (parts.RECORD_FIELDS)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    dir: Location  # --hdf5_dir
    settings: dict
    units: tuple  # UnitSpec, in output order
    done: bool = False  # assembled by the driver before the job started
    run_settings: dict = field(default_factory=dict)  # where and how it was made: the `run` attribute

    @property
    def parts(self) -> PartsStore:
        return PartsStore(self.dir, self.name)


@dataclass(frozen=True)
class RunInfo:
    """What every output of a run shares (several partitions' outputs too)."""

    dtype: str  # of the vectors: float16 or float32
    compression: int  # gzip level, 0 for none
    local: bool  # --pooling local: several vectors a row, and an `offsets` dataset


def partial_path(out_dir: Location, name: str) -> str:
    """The local file an output is built in before it is published."""
    return os.path.join(out_dir.staging(), name + PARTIAL_SUFFIX)


def unfinished(name: str) -> bool:
    """A listing entry that an unfinished run left (an output's partial file or parts folder)."""
    return name.endswith((SUFFIX + PARTIAL_SUFFIX, SUFFIX + PARTS_SUFFIX))


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def assemble(spec: OutputSpec, run: RunInfo, records: dict, duplicates_dropped: int = 0) -> None:
    """The commit: copy the parts of every unit (`records`: unit index -> record, all of them), in
    unit order, into NAME.hdf5.partial, publish it as NAME.hdf5, then remove the parts."""
    from ilias_ray.plan import library_versions

    parts = spec.parts
    dim = max((r["dim"] for r in records.values()), default=0)
    opts = {"compression": "gzip", "compression_opts": run.compression} if run.compression else {}
    partial = partial_path(spec.dir, spec.name)
    skipped, ends, duplicates = [], [], []
    with h5py.File(partial, "w") as f:
        if dim:
            chunk = max(1, min(1024, CHUNK_BYTES // (dim * 4)))
            feats = f.create_dataset(
                FEATURES.name, (0, dim), maxshape=(None, dim), dtype=run.dtype, chunks=(chunk, dim), **opts
            )
        else:  # nothing to store: a valid empty array
            feats = f.create_dataset(FEATURES.name, (0, 0), dtype=run.dtype)
        index = f.create_dataset(INDEX.name, (0,), maxshape=(None,), dtype=ASCII, chunks=(1024,))
        offsets = (
            f.create_dataset(OFFSETS.name, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))
            if run.local
            else None
        )
        total_vectors = 0
        for k, unit in enumerate(spec.units):
            if k == 1:
                faults.hit("assemble")  # tests stop or kill the run here, half-way through the copy
            rec = records[k]
            ends.append({"name": unit.name, "rows": rec["count"], "end": rec["end"]})
            duplicates += rec.get("duplicates", [])
            for block in parts.read(k, dim, run.dtype):
                skipped += block.skipped
                if not block.ids:
                    continue
                _append(feats, block.vectors)
                _append(index, block.ids)
                if offsets is not None:
                    _append(offsets, total_vectors + np.cumsum(block.nvec))
                total_vectors += len(block.vectors)
        f.create_dataset(SKIPPED_INDEX.name, data=np.array([s[0] for s in skipped], dtype=object), dtype=ASCII)
        f.create_dataset(SKIPPED_REASON.name, data=np.array([s[1] for s in skipped], dtype=object), dtype=UTF8)
        f.create_dataset(DUPLICATE_INDEX.name, data=np.array(duplicates, dtype=object), dtype=ASCII)
        f.attrs[A_SETTINGS] = settings_json(spec.settings)
        f.attrs[A_FINGERPRINT] = fingerprint(spec.settings)
        f.attrs[A_RUN] = json.dumps(spec.run_settings, sort_keys=True)
        f.attrs[A_VERSIONS] = json.dumps(library_versions(), sort_keys=True)
        f.attrs[A_UNITS] = json.dumps(ends)
        f.attrs[A_ROWS] = index.shape[0]
        f.attrs[A_SKIPPED] = len(skipped)
        f.attrs[A_DROPPED] = duplicates_dropped
        f.attrs[A_DUPLICATES] = len(duplicates)
        f.attrs[A_COMPLETE] = True
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    (spec.dir / spec.name).publish(partial)  # atomic: finished or absent
    parts.remove()


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
