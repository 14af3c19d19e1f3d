"""The commit step: an output's parts, copied in unit order into one HDF5 file.

A file appears under its final name only complete: the parts are copied, in unit order, into a
local `NAME.hdf5.partial` (in --hdf5_dir, or in the staging folder for a bucket), which is then
fsynced and published (a rename and an fsync of the directory, or an upload) as `NAME.hdf5`."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np

from ilias_ray.output.parts import PartsStore
from ilias_ray.output.schema import (
    A_COMPLETE,
    A_DROPPED,
    A_DUPLICATES,
    A_FINGERPRINT,
    A_ROWS,
    A_RUN,
    A_SETTINGS,
    A_SKIPPED,
    A_UNITS,
    A_VERSIONS,
    ASCII,
    DUPLICATE_INDEX,
    FEATURES,
    INDEX,
    OFFSETS,
    SKIPPED_INDEX,
    SKIPPED_REASON,
    UTF8,
    fingerprint,
    library_versions,
    partial_path,
    settings_json,
)
from ilias_ray.plan_types import Output, OutputFormat
from ilias_ray.testing import faults

CHUNK_BYTES = 1 << 20  # features are chunked in about 1 MiB (at 4 bytes a value), at most 1024 rows


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


def assemble(output: Output, fmt: OutputFormat, records: dict, resent_dropped: int = 0) -> None:
    """The commit: copy the parts of every unit (`records`: unit index -> record, all of them), in
    unit order, into NAME.hdf5.partial, publish it as NAME.hdf5, then remove the parts.
    `resent_dropped`: rows the sink received twice (retried tasks) and kept once."""
    parts = PartsStore(output.dir, output.name)
    dim = max((r["dim"] for r in records.values()), default=0)
    opts = {"compression": "gzip", "compression_opts": fmt.compression} if fmt.compression else {}
    partial = partial_path(output.dir, output.name)
    skipped, ends, repeated = [], [], []
    with h5py.File(partial, "w") as f:
        if dim:
            chunk = max(1, min(1024, CHUNK_BYTES // (dim * 4)))
            feats = f.create_dataset(
                FEATURES.name, (0, dim), maxshape=(None, dim), dtype=fmt.dtype, chunks=(chunk, dim), **opts
            )
        else:  # nothing to store: a valid empty array
            feats = f.create_dataset(FEATURES.name, (0, 0), dtype=fmt.dtype)
        index = f.create_dataset(INDEX.name, (0,), maxshape=(None,), dtype=ASCII, chunks=(1024,))
        offsets = (
            f.create_dataset(OFFSETS.name, data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))
            if fmt.per_token
            else None
        )
        total_vectors = 0
        for k, unit in enumerate(output.units):
            if k == 1:
                faults.hit("assemble")  # tests stop or kill the run here, half-way through the copy
            rec = records[k]
            ends.append({"name": unit.name, "rows": rec["count"], "end": rec["end"]})
            repeated += rec.get("duplicates", [])  # the record's key: IDs the input repeats
            for block in parts.read(k, dim, fmt.dtype):
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
        f.create_dataset(DUPLICATE_INDEX.name, data=np.array(repeated, dtype=object), dtype=ASCII)
        f.attrs[A_SETTINGS] = settings_json(output.settings)
        f.attrs[A_FINGERPRINT] = fingerprint(output.settings)
        f.attrs[A_RUN] = json.dumps(output.run_settings, sort_keys=True)
        f.attrs[A_VERSIONS] = json.dumps(library_versions(), sort_keys=True)
        f.attrs[A_UNITS] = json.dumps(ends)
        f.attrs[A_ROWS] = index.shape[0]
        f.attrs[A_SKIPPED] = len(skipped)
        f.attrs[A_DROPPED] = resent_dropped
        f.attrs[A_DUPLICATES] = len(repeated)
        f.attrs[A_COMPLETE] = True
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    (output.dir / output.name).publish(partial)  # atomic: finished or absent
    parts.remove()
