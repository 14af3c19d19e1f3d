"""Stage 4 (one actor, on the node that owns --hdf5_dir): reorder rows, write HDF5 files.

Rows reach the sink out of order. Each output keeps a cursor (unit, position) and a reorder
buffer keyed by sequence id; every contiguous run is appended to resizable datasets, so memory
depends on how far rows arrive out of order, not on the chunk size. A file is written as
`NAME.hdf5.partial` and renamed to `NAME.hdf5` only once every row its units owe is written.
"""

from __future__ import annotations

import json
import os
import time

import h5py
import numpy as np

from ilias_ray import __version__
from ilias_ray.config import settings_json
from ilias_ray.plan import fingerprint, seq_id
from ilias_ray.read import MARKER, SKIP

FLUSH_ROWS = 1024
ASCII = h5py.string_dtype("ascii")
UTF8 = h5py.string_dtype("utf-8")


def library_versions() -> dict:
    import importlib.metadata as md

    out = {"ilias_ray": __version__}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "ray", "h5py", "pillow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


class OutputWriter:
    def __init__(self, spec: dict, run: dict):
        self.spec = spec  # name, path, units [(uid, name, count or None, size)], settings
        self.run = run  # dtype, compression, local, run settings
        self.units = spec["units"]
        self.counts = {u[0]: u[2] for u in self.units}
        self.ends = {}  # uid -> why the unit stopped ("eof", "truncated: ...")
        self.offsets = {u[0]: 0 for u in self.units}
        self.k = 0  # cursor: index into units
        self.pos = 0  # cursor: position inside the unit
        self.buffer = {}  # seq -> (id, kind, feat, nvec, note)
        self.pending = []
        self.skipped = []  # (id, reason)
        self.rows = 0
        self.vectors = 0
        self.duplicates = 0
        self.finished = False
        self.f = None
        self.started = time.time()

    # -- progress --
    def fraction(self) -> float:
        if self.finished:
            return 1.0
        total = sum(u[3] for u in self.units)
        if total:  # tar shards: bytes consumed, an order-independent estimate
            done = sum(u[3] if u[0] in self.ends else min(self.offsets[u[0]], u[3]) for u in self.units)
            return done / total
        expected = sum(c or 0 for c in self.counts.values())
        return (self.rows + len(self.skipped)) / expected if expected else 0.0

    # -- rows in --
    def add(self, seq, id_, kind, feat, nvec, note, off, unit) -> None:
        if self.finished or seq in self.buffer or seq < seq_id(self.units[self.k][0], self.pos):
            self.duplicates += 1  # a retried task may resend rows: keep the first copy
            return
        self.offsets[unit] = max(self.offsets[unit], int(off))
        self.buffer[seq] = (id_, kind, feat, nvec, note)

    def end_unit(self, uid, count, note) -> None:
        self.counts[uid] = int(count)
        self.ends[uid] = note

    def drain(self) -> None:
        while not self.finished:
            uid, _name, _c, _size = self.units[self.k]
            count = self.counts[uid]
            if count is not None and self.pos >= count:
                self.ends.setdefault(uid, "eof")
                self.k += 1
                self.pos = 0
                if self.k == len(self.units):
                    self.finalize()
                continue
            row = self.buffer.pop(seq_id(uid, self.pos), None)
            if row is None:
                break
            self.pos += 1
            id_, kind, feat, nvec, note = row
            if kind == SKIP:
                self.skipped.append((id_, note))
            else:
                self.pending.append((id_, feat, nvec))
                if len(self.pending) >= FLUSH_ROWS:
                    self.flush()
        self.flush()

    # -- HDF5 --
    def _open(self, dim: int) -> None:
        comp = self.run["compression"]
        opts = {"compression": "gzip", "compression_opts": comp} if comp else {}
        self.f = h5py.File(self.spec["path"] + ".partial", "w")
        if dim:
            rows_per_chunk = max(1, min(1024, (1 << 20) // (dim * 4)))
            self.f.create_dataset("features", (0, dim), maxshape=(None, dim), dtype=self.run["dtype"],
                                  chunks=(rows_per_chunk, dim), **opts)
        else:  # nothing to store: a valid empty array
            self.f.create_dataset("features", (0, 0), dtype=self.run["dtype"])
        self.f.create_dataset("index", (0,), maxshape=(None,), dtype=ASCII, chunks=(1024,))
        if self.run["local"]:
            self.f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(1024,))

    def flush(self) -> None:
        if not self.pending:
            return
        itemsize = np.dtype(self.run["dtype"]).itemsize
        vecs = [np.frombuffer(f, self.run["dtype"]).reshape(n, -1) for _, f, n in self.pending]
        if self.f is None:
            self._open(len(self.pending[0][1]) // itemsize // self.pending[0][2])
        _append(self.f["features"], np.concatenate(vecs))
        _append(self.f["index"], [i for i, _, _ in self.pending])
        if self.run["local"]:
            ends = self.vectors + np.cumsum([n for _, _, n in self.pending])
            _append(self.f["offsets"], ends)
        self.vectors += sum(n for _, _, n in self.pending)
        self.rows += len(self.pending)
        self.pending = []

    def finalize(self) -> None:
        self.flush()
        if self.f is None:  # every row was skipped: still write a valid, empty file
            self._open(0)
        f = self.f
        f.create_dataset("skipped_index", data=np.array([s[0] for s in self.skipped], dtype=object), dtype=ASCII)
        f.create_dataset("skipped_reason", data=np.array([s[1] for s in self.skipped], dtype=object), dtype=UTF8)
        settings = self.spec["settings"]
        f.attrs["ilias_ray_settings"] = settings_json(settings)
        f.attrs["fingerprint"] = fingerprint(settings)
        f.attrs["run"] = json.dumps(self.run["run_settings"], sort_keys=True)
        f.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
        f.attrs["units"] = json.dumps(
            [{"name": u[1], "rows": self.counts[u[0]], "end": self.ends.get(u[0], "eof")} for u in self.units]
        )
        f.attrs["num_rows"] = self.rows
        f.attrs["num_skipped"] = len(self.skipped)
        f.attrs["duplicates_dropped"] = self.duplicates
        f.attrs["complete"] = True
        f.flush()
        os.fsync(f.id.get_vfd_handle())
        f.close()
        self.f = None
        os.replace(self.spec["path"] + ".partial", self.spec["path"])  # atomic: finished or absent
        self.finished = True


class Sink:
    """Ray Data callable class; must run as a single actor. Returns progress rows."""

    def __init__(self, outputs: list, run: dict):
        self.writers = [OutputWriter(spec, run) for spec in outputs]
        for w in self.writers:
            w.drain()  # an output whose units are all empty is complete at once

    def __call__(self, batch: dict) -> dict:
        touched = set()
        for i in range(len(batch["seq"])):
            w = self.writers[int(batch["out"][i])]
            touched.add(int(batch["out"][i]))
            if batch["kind"][i] == MARKER:
                w.end_unit(int(batch["unit"][i]), batch["pos"][i], str(batch["note"][i]))
            else:
                w.add(int(batch["seq"][i]), str(batch["id"][i]), int(batch["kind"][i]), batch["feat"][i],
                      int(batch["nvec"][i]), str(batch["note"][i]), batch["off"][i], int(batch["unit"][i]))
        for o in touched:
            self.writers[o].drain()
        rows = [self.writers[o] for o in sorted(touched)]
        return {
            "out": np.array(sorted(touched), np.int32),
            "rows": np.array([w.rows for w in rows], np.int64),
            "skipped": np.array([len(w.skipped) for w in rows], np.int64),
            "fraction": np.array([w.fraction() for w in rows], np.float64),
            "finished": np.array([w.finished for w in rows], bool),
            "truncated": np.array([sum(1 for e in w.ends.values() if e != "eof") for w in rows], np.int64),
        }
