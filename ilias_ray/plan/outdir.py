"""The output directory before a run: it takes writes, has room, and holds nothing stale of the
outputs to redo."""

from __future__ import annotations

import os
import shutil

from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.output.parts import PartsStore
from ilias_ray.output.schema import partial_path
from ilias_ray.plan_types import Plan
from ilias_ray.storage.location import Location

MIN_FREE_BYTES = 64 << 20  # below this a run would fail on its first part files


def check_output_dir(cfg: Config) -> None:
    """Make sure --hdf5_dir (and, for a bucket, the local staging directory) takes writes.

    Files are written in the staging directory (--hdf5_dir itself when local) and published from
    there."""
    out_dir = Location.of(cfg.hdf5_dir)
    staging = out_dir.staging()
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as e:
        flag = "--hdf5_dir" if out_dir.local else "the staging directory (ILIAS_RAY_STAGING_DIR)"
        raise UserError(f"{flag} {staging!r}: {e.strerror or e}") from None
    if out_dir.local and not os.access(staging, os.W_OK):
        raise UserError(f"--hdf5_dir {cfg.hdf5_dir!r} is not writable")
    if not out_dir.local:
        out_dir.check_writable("--hdf5_dir")
    free = shutil.disk_usage(staging).free
    if free < MIN_FREE_BYTES:
        where = f"--hdf5_dir {cfg.hdf5_dir!r}" if out_dir.local else f"the staging directory {staging!r}"
        raise UserError(
            f"{where} has only {free >> 20} MiB free (need at least "
            f"{MIN_FREE_BYTES >> 20} MiB to start); make room and rerun"
        )


def drop_stale(cfg: Config, plan: Plan) -> None:
    """Drop what earlier runs left of the outputs to redo: partial files, the parts of an output
    none of whose units is kept, and a bucket's earlier staging copies (the bucket is the record).
    Only under the outputs' locks (output/lock.py): these may be another live run's files otherwise."""
    out_dir = Location.of(cfg.hdf5_dir)
    for out in plan.outputs:
        partial = partial_path(out_dir, out.name)
        if os.path.exists(partial):
            os.remove(partial)
        store = PartsStore(out_dir, out.name)
        store.drop_staged()
        if not any(u.record is not None for u in out.units):
            store.loc.delete_dir()  # other settings, --overwrite, or nothing finished
