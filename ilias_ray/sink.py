"""Stage 4 (one actor, on the driver's node): reorder rows, write HDF5 files.

Rows reach the sink out of order. Each unit (tar shard, or folder list) has its own cursor and
reorder buffer, and streams its in-order rows to a part file in a local staging folder, so memory
depends on how far rows arrive out of order, not on how many rows a shard or chunk has, and a
later shard never waits in memory for an earlier one. A finished unit's part is published to
`NAME.hdf5.parts/` in --hdf5_dir (a rename when local, an upload to a bucket) and then its
`K.json` record is written: after a crash, even on a new cluster, a rerun redoes only the units
without a record. When every unit of an output is done, the parts are copied in order into a
local `NAME.hdf5.partial`, which is published as `NAME.hdf5` only once complete.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil

import h5py
import numpy as np

from ilias_ray import faults
from ilias_ray.config import UserError, settings_json
from ilias_ray.plan import PARTIAL_SUFFIX, PARTS_SUFFIX, fingerprint, library_versions, parts_location
from ilias_ray.read import MARKER, SKIP
from ilias_ray.storage import Location

PROGRESS_COLUMNS = {"out": np.int32, "rows": np.int64, "skipped": np.int64, "fraction": np.float64,
                    "finished": bool, "truncated": np.int64, "duplicates": np.int64, "retries": np.int64}
COPY_ROWS = 8192  # rows per block when assembling the HDF5 file
ASCII = h5py.string_dtype("ascii")
UTF8 = h5py.string_dtype("utf-8")


def _append(ds, values) -> None:
    n = ds.shape[0]
    ds.resize(n + len(values), axis=0)
    ds[n:] = values


class UnitWriter:
    """One unit's rows, in position order, appended to `K.feat` (raw vectors) and `K.rows`
    (one JSON line per row: id, vectors, or the skip reason) in the staging folder; when the
    unit is done both are published to the parts folder, then `K.json` marks it complete."""

    def __init__(self, staging: str, parts: Location, k: int, dtype: str):
        self.base = os.path.join(staging, str(k))
        self.parts, self.k = parts, k
        self.dtype = dtype
        self.pos = 0
        self.count = None  # known from the marker (tars) or the plan (folders)
        self.end = "eof"
        self.duplicates = []  # IDs the input itself repeats (from the shard's marker)
        self.retries = 0  # reads of the shard that were retried (from its marker)
        self.buffer = {}  # pos -> row
        self.rows = self.skipped = self.vectors = 0
        self.dim = 0
        self.done = False
        self.record = None
        self.feat = self.lines = None

    def _open(self):
        self.feat = open(self.base + ".feat.tmp", "wb")
        self.lines = open(self.base + ".rows.tmp", "w")

    def drain(self) -> None:
        while not self.done:
            if self.count is not None and self.pos >= self.count:
                self.close()
                return
            row = self.buffer.pop(self.pos, None)
            if row is None:
                return
            if self.feat is None:
                self._open()
            id_, kind, feat, nvec, note = row
            faults.hit("sink_write")
            if kind == SKIP:
                self.lines.write(json.dumps([id_, 0, note]) + "\n")
                self.skipped += 1
            else:
                self.feat.write(feat)
                self.lines.write(json.dumps([id_, nvec]) + "\n")
                self.dim = len(feat) // np.dtype(self.dtype).itemsize // nvec
                self.rows += 1
                self.vectors += nvec
            self.pos += 1

    def close(self) -> None:
        if self.feat is None:
            self._open()
        for f in (self.feat, self.lines):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        sizes = {ext: os.path.getsize(f"{self.base}.{ext}.tmp") for ext in ("feat", "rows")}
        for ext in ("feat", "rows"):  # the staged copy stays for the assembly
            (self.parts / f"{self.k}.{ext}").publish(f"{self.base}.{ext}.tmp", keep_as=f"{self.base}.{ext}")
        self.record = {"count": self.count, "end": self.end, "rows": self.rows, "skipped": self.skipped,
                       "vectors": self.vectors, "dim": self.dim, "duplicates": self.duplicates, "retries": self.retries,
                       "feat_bytes": sizes["feat"], "rows_bytes": sizes["rows"]}
        (self.parts / f"{self.k}.json").write_bytes(json.dumps(self.record).encode())  # last: the proof
        self.done = True


class OutputWriter:
    def __init__(self, spec: dict, run: dict):
        self.spec = spec  # name, dir (Location), settings, units [(uid, name, count or None, size, record or None)]
        self.run = run  # dtype, compression, local, run settings
        self.units = spec["units"]
        self.dir = spec["dir"] if isinstance(spec["dir"], Location) else Location.of(spec["dir"])
        self.parts = parts_location(self.dir, spec["name"])
        self.staging = os.path.join(self.dir.staging(), spec["name"] + PARTS_SUFFIX)  # == parts when local
        self.writers = {}
        self.records = {}  # k -> the unit's completion record
        self.offsets = {}
        self.duplicates = 0
        self.finished = bool(spec.get("done"))  # assembled by the driver before the job started
        if self.finished:
            return
        os.makedirs(self.staging, exist_ok=True)
        self.parts.makedirs()
        meta = {"fingerprint": fingerprint(spec["settings"]), "settings": spec["settings"]}
        (self.parts / "meta.json").write_bytes(json.dumps(meta).encode())
        for k, (uid, _name, count, _size, record) in enumerate(self.units):
            if record is not None:
                self.records[k] = record  # done by an earlier run
            else:
                w = UnitWriter(self.staging, self.parts, k, run["dtype"])
                w.count = count
                self.writers[uid] = (k, w)
        self.offsets = {u[0]: 0 for u in self.units}

    # -- progress --
    @property
    def rows(self) -> int:
        return sum(r["rows"] for r in self.records.values()) + sum(w.rows for _, w in self.writers.values()
                                                                   if not w.done)

    @property
    def skipped(self) -> int:
        return sum(r["skipped"] for r in self.records.values()) + sum(w.skipped for _, w in self.writers.values()
                                                                      if not w.done)

    def fraction(self) -> float:
        if self.finished:
            return 1.0
        total = sum(u[3] for u in self.units)
        if total:  # tar shards: bytes consumed, an order-independent estimate
            done = sum(u[3] if k in self.records else min(self.offsets[u[0]], u[3]) for k, u in enumerate(self.units))
            return done / total
        expected = sum(u[2] or 0 for u in self.units)
        return (self.rows + self.skipped) / expected if expected else 0.0

    def truncated(self) -> int:
        return sum(1 for r in self.records.values() if r["end"] != "eof")

    def progress(self, out: int) -> dict:
        """One progress row for the driver."""
        return {"out": out, "rows": self.rows, "skipped": self.skipped, "fraction": self.fraction(),
                "finished": self.finished, "truncated": self.truncated(), "duplicates": self.input_duplicates(),
                "retries": sum(r.get("retries", 0) for r in self.records.values())}

    def input_duplicates(self) -> int:
        return sum(len(r.get("duplicates", [])) for r in self.records.values())

    # -- rows in --
    def add(self, uid, pos, id_, kind, feat, nvec, note, off) -> None:
        k, w = self.writers[uid]
        if w.done or pos < w.pos or pos in w.buffer:
            self.duplicates += 1  # a retried task may resend rows: keep the first copy
            return
        self.offsets[uid] = max(self.offsets[uid], int(off))
        w.buffer[pos] = (id_, kind, feat, nvec, note)

    def end_unit(self, uid, count, note) -> None:
        _k, w = self.writers[uid]
        info = json.loads(note)  # see read.marker_note
        w.count, w.end, w.duplicates, w.retries = int(count), info["end"], info["duplicates"], info.get("retries", 0)

    def drain(self) -> None:
        for k, w in self.writers.values():
            if not w.done:
                w.drain()
                if w.done:
                    self.records[k] = w.record
        if not self.finished and len(self.records) == len(self.units):
            self.assemble()

    # -- HDF5 --
    def assemble(self) -> None:
        """Copy the parts, in unit order, into NAME.hdf5.partial; rename it when complete."""
        dtype = self.run["dtype"]
        dim = max((r["dim"] for r in self.records.values()), default=0)
        comp = self.run["compression"]
        opts = {"compression": "gzip", "compression_opts": comp} if comp else {}
        partial = os.path.join(self.dir.staging(), self.spec["name"] + PARTIAL_SUFFIX)
        skipped, ends, duplicates = [], [], []
        with h5py.File(partial, "w") as f:
            if dim:
                chunk = max(1, min(1024, (1 << 20) // (dim * 4)))
                feats = f.create_dataset("features", (0, dim), maxshape=(None, dim), dtype=dtype,
                                         chunks=(chunk, dim), **opts)
            else:  # nothing to store: a valid empty array
                feats = f.create_dataset("features", (0, 0), dtype=dtype)
            index = f.create_dataset("index", (0,), maxshape=(None,), dtype=ASCII, chunks=(1024,))
            local = self.run["local"]
            offsets = f.create_dataset("offsets", data=np.zeros(1, np.int64), maxshape=(None,),
                                       chunks=(1024,)) if local else None
            total_vectors = 0
            for k, (uid, name, _c, _s, _r) in enumerate(self.units):
                if k == 1:
                    faults.hit("assemble")  # tests stop or kill the run here, half-way through the copy
                rec = self.records[k]
                ends.append({"name": name, "rows": rec["count"], "end": rec["end"]})
                duplicates += rec.get("duplicates", [])
                with self._part(k, "rows") as raw, io.TextIOWrapper(raw, encoding="utf-8") as lines, \
                        self._part(k, "feat") as blob:
                    batch = []
                    for line in lines:
                        row = json.loads(line)
                        if row[1] == 0:
                            skipped.append((row[0], row[2]))
                            continue
                        batch.append(row)
                        if len(batch) >= COPY_ROWS:
                            total_vectors = self._copy(batch, blob, dim, feats, index, offsets, total_vectors)
                            batch = []
                    total_vectors = self._copy(batch, blob, dim, feats, index, offsets, total_vectors)
            f.create_dataset("skipped_index", data=np.array([s[0] for s in skipped], dtype=object), dtype=ASCII)
            f.create_dataset("skipped_reason", data=np.array([s[1] for s in skipped], dtype=object), dtype=UTF8)
            # IDs the input holds more than once (every occurrence has its row); verify reads this.
            f.create_dataset("duplicate_index", data=np.array(duplicates, dtype=object), dtype=ASCII)
            settings = self.spec["settings"]
            f.attrs["ilias_ray_settings"] = settings_json(settings)
            f.attrs["fingerprint"] = fingerprint(settings)
            f.attrs["run"] = json.dumps(self.run["run_settings"], sort_keys=True)
            f.attrs["versions"] = json.dumps(library_versions(), sort_keys=True)
            f.attrs["units"] = json.dumps(ends)
            f.attrs["num_rows"] = index.shape[0]
            f.attrs["num_skipped"] = len(skipped)
            f.attrs["duplicates_dropped"] = self.duplicates
            f.attrs["num_input_duplicates"] = len(duplicates)
            f.attrs["complete"] = True
            f.flush()
            os.fsync(f.id.get_vfd_handle())
        (self.dir / self.spec["name"]).publish(partial)  # atomic: finished or absent
        try:
            self.parts.delete_dir()
        except OSError:  # the file is complete; a leftover parts folder is only untidy
            pass
        shutil.rmtree(self.staging, ignore_errors=True)
        self.finished = True

    def _part(self, k: int, ext: str):
        """A finished unit's part file: the staged copy, else the published one (an earlier run's)."""
        staged = os.path.join(self.staging, f"{k}.{ext}")
        return open(staged, "rb") if os.path.exists(staged) else (self.parts / f"{k}.{ext}").open_reader()

    def _copy(self, batch, blob, dim, feats, index, offsets, total_vectors) -> int:
        if not batch:
            return total_vectors
        n = sum(r[1] for r in batch)
        vecs = np.frombuffer(blob.read(n * dim * np.dtype(self.run["dtype"]).itemsize), self.run["dtype"])
        _append(feats, vecs.reshape(n, dim))
        _append(index, [r[0] for r in batch])
        if offsets is not None:
            _append(offsets, total_vectors + np.cumsum([r[1] for r in batch]))
        return total_vectors + n


class Sink:
    """Ray Data callable class; must run as a single actor. Returns progress rows."""

    def __init__(self, outputs: list, run: dict):
        self.writers = [OutputWriter(spec, run) for spec in outputs]
        for w in self.writers:
            w.drain()  # an output whose units are all done already is assembled at once

    def __call__(self, batch: dict) -> dict:
        try:
            return self._call(batch)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                out = self.writers[0].dir
                where = f"--hdf5_dir {out}" if out.local else f"the staging directory {out.staging()} (for {out})"
                raise UserError(f"{where}: {e.strerror}; no file was finished by this write. "
                                "Make room and rerun the same command: finished shards are kept") from None
            raise

    def _call(self, batch: dict) -> dict:
        touched = set()
        for i in range(len(batch["seq"])):
            o = int(batch["out"][i])
            w = self.writers[o]
            touched.add(o)
            if batch["kind"][i] == MARKER:
                w.end_unit(int(batch["unit"][i]), batch["pos"][i], str(batch["note"][i]))
            else:
                w.add(int(batch["unit"][i]), int(batch["pos"][i]), str(batch["id"][i]), int(batch["kind"][i]),
                      batch["feat"][i], int(batch["nvec"][i]), str(batch["note"][i]), batch["off"][i])
        for o in touched:
            self.writers[o].drain()
        rows = [self.writers[o].progress(o) for o in sorted(touched)]
        return {k: np.array([r[k] for r in rows], dtype) for k, dtype in PROGRESS_COLUMNS.items()}
