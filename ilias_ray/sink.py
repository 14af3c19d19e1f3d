"""Stage 4 (sink actors, on the driver's node): put rows back in order, and say how far each output is.

Each output file belongs to one sink actor: output `o` to sink `o % shards` (`route` sends each
row there), so one output's rows always meet in one process, and more sinks take more rows per
second when many outputs are in flight (bench/scale.py).

Rows reach the sink out of order. Each unit (tar shard, or folder list) has its own cursor and
reorder buffer, and hands its in-order rows to its part writer (parts.py), so memory depends on
how far rows arrive out of order, not on how many rows a shard or chunk has, and a later shard
never waits in memory for an earlier one. A row is written exactly once: a resent copy (a retried
task) of a position already written or buffered is dropped. When a unit's marker has said how
many rows it owes and they are all written, the part is made durable; when every unit of an
output is, the output is assembled (hdf5_out.assemble) and published.
"""

from __future__ import annotations

import errno
import json
from typing import Optional

import numpy as np
import ray

from ilias_ray import faults
from ilias_ray.blocks import PACKED, concat, unpack
from ilias_ray.config import UserError
from ilias_ray.hdf5_out import OutputSpec, RunInfo, assemble
from ilias_ray.parts import PartWriter
from ilias_ray.rows import PROGRESS_COLUMNS, SINK, Kind


class UnitRows:
    """One unit's reorder buffer: rows wait in `buffer` until every earlier position is written."""

    def __init__(self, part: PartWriter, count: Optional[int]):
        self.part = part
        self.pos = 0  # the next position to write
        self.count = count  # known from the marker (tars) or the plan (folders)
        self.end = "eof"
        self.duplicates = []  # IDs the input itself repeats (from the shard's marker)
        self.retries = 0  # reads of the shard that were retried (from its marker)
        self.buffer = {}  # pos -> (id, kind, feat, nvec, note)
        self.record = None  # set once the unit is durable

    @property
    def done(self) -> bool:
        return self.record is not None

    def drain(self) -> None:
        while not self.done:
            if self.count is not None and self.pos >= self.count:
                self.record = self.part.close(self.count, self.end, self.duplicates, self.retries)
                return
            row = self.buffer.pop(self.pos, None)
            if row is None:
                return
            id_, kind, feat, nvec, note = row
            faults.hit("sink_write")
            if kind == Kind.SKIP:
                self.part.skip(id_, note)
            else:
                self.part.add(id_, feat, nvec)
            self.pos += 1


def progress_row(out: int, records, live=(), fraction: float = 1.0, finished: bool = True) -> dict:
    """One progress row for the driver: `records` of finished units, `live` part writers of the others."""
    records, live = list(records), list(live)
    return {
        "out": out,
        "rows": sum(r["rows"] for r in records) + sum(p.rows for p in live),
        "skipped": sum(r["skipped"] for r in records) + sum(p.skipped for p in live),
        "fraction": fraction,
        "finished": finished,
        "truncated": sum(1 for r in records if r["end"] != "eof"),
        "duplicates": sum(len(r.get("duplicates", [])) for r in records),
        "retries": sum(r.get("retries", 0) for r in records),
    }


def progress_batch(rows: list) -> dict:
    """Progress rows as the numpy batch the sink returns (PROGRESS_COLUMNS)."""
    return {k: np.array([r[k] for r in rows], dtype) for k, dtype in PROGRESS_COLUMNS.items()}


class OutputRows:
    """The rows of one output: a UnitRows per unit still to write, and the records of the others."""

    def __init__(self, spec: OutputSpec, run: RunInfo):
        self.spec, self.run = spec, run
        self.units = spec.units
        self.dir = spec.dir
        self.parts = spec.parts
        self.cursors = {}  # uid -> (k, UnitRows)
        self.records = {}  # k -> the unit's completion record
        self.offsets = {}  # uid -> bytes of the shard read so far (progress)
        self.duplicates = 0  # resent rows dropped
        self.finished = spec.done
        if self.finished:
            return
        self.parts.begin(spec.settings)
        for k, u in enumerate(self.units):
            if u.record is not None:
                self.records[k] = u.record  # done by an earlier run
            else:
                self.cursors[u.uid] = (k, UnitRows(self.parts.writer(k, run.dtype), u.count))
        self.offsets = {u.uid: 0 for u in self.units}

    # -- progress --
    def _live(self) -> list:
        return [c.part for _, c in self.cursors.values() if not c.done]

    def fraction(self) -> float:
        if self.finished:
            return 1.0
        total = sum(u.size for u in self.units)
        if total:  # tar shards: bytes consumed, an order-independent estimate
            done = sum(
                u.size if k in self.records else min(self.offsets[u.uid], u.size) for k, u in enumerate(self.units)
            )
            return done / total
        expected = sum(u.count or 0 for u in self.units)
        row = progress_row(0, self.records.values(), self._live())
        return (row["rows"] + row["skipped"]) / expected if expected else 0.0

    def progress(self, out: int) -> dict:
        """One progress row for the driver."""
        return progress_row(out, self.records.values(), self._live(), self.fraction(), self.finished)

    # -- rows in --
    def add(self, uid, pos, id_, kind, feat, nvec, note, off) -> None:
        _k, c = self.cursors[uid]
        if c.done or pos < c.pos or pos in c.buffer:
            self.duplicates += 1  # a retried task may resend rows: keep the first copy
            return
        self.offsets[uid] = max(self.offsets[uid], int(off))
        c.buffer[pos] = (id_, kind, feat, nvec, note)

    def end_unit(self, uid, count, note) -> None:
        _k, c = self.cursors[uid]
        info = json.loads(note)  # see read.marker_note
        c.count, c.end, c.duplicates, c.retries = int(count), info["end"], info["duplicates"], info.get("retries", 0)

    def drain(self) -> None:
        for k, c in self.cursors.values():
            if not c.done:
                c.drain()
                if c.done:
                    self.records[k] = c.record
        if not self.finished and len(self.records) == len(self.units):
            assemble(self.spec, self.run, self.records, self.duplicates)
            self.finished = True


class Sink:
    """One sink actor: the outputs `o` with `o % shards == shard`. Returns progress rows.

    Also a Ray Data callable class (`shards=1`, one actor: every output)."""

    def __init__(self, outputs: list, run: RunInfo, shard: int = 0, shards: int = 1):
        self.writers = {o: OutputRows(spec, run) for o, spec in enumerate(outputs) if o % shards == shard}
        for w in self.writers.values():
            w.drain()  # an output whose units are all done already is assembled at once

    def write(self, batch: dict) -> dict:
        """The sink actor's method (`route` calls it)."""
        return self(batch)

    def __call__(self, batch: dict) -> dict:
        try:
            return self._call(batch)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
                out = next(iter(self.writers.values())).dir
                where = f"--hdf5_dir {out}" if out.local else f"the staging directory {out.staging()} (for {out})"
                raise UserError(
                    f"{where}: {e.strerror}; no file was finished by this write. "
                    "Make room and rerun the same command: finished shards are kept"
                ) from None
            raise

    def _call(self, batch: dict) -> dict:
        SINK.check(batch)
        touched = set()
        for i in range(len(batch["seq"])):
            o = int(batch["out"][i])
            w = self.writers[o]  # a KeyError: a row routed to the wrong sink
            touched.add(o)
            if batch["kind"][i] == Kind.MARKER:
                w.end_unit(int(batch["unit"][i]), batch["pos"][i], str(batch["note"][i]))
            else:
                w.add(
                    int(batch["unit"][i]),
                    int(batch["pos"][i]),
                    str(batch["id"][i]),
                    int(batch["kind"][i]),
                    batch["feat"][i],
                    int(batch["nvec"][i]),
                    str(batch["note"][i]),
                    batch["off"][i],
                )
        for o in touched:
            self.writers[o].drain()
        return progress_batch([self.writers[o].progress(o) for o in sorted(touched)])


def route(batch: dict, sinks: list) -> dict:
    """The sink stage's task (Ray Data, a task pool): the rows of output `o` go to
    `sinks[o % len(sinks)]`; it waits for the sinks it called (so a slow sink holds the stage
    back: backpressure) and returns their progress rows. Takes packed blocks (blocks.py) or plain rows."""
    if PACKED in batch:
        batch = concat(unpack(batch))
    if len(sinks) == 1:
        calls = [sinks[0].write.remote(batch)]
    else:
        shard = batch["out"] % len(sinks)
        calls = [sinks[int(k)].write.remote({c: v[shard == k] for c, v in batch.items()}) for k in np.unique(shard)]
    try:
        done = ray.get(calls)
    except ray.exceptions.RayActorError as e:
        why = str(e).strip().splitlines()[0][:200]
        raise UserError(
            f"the sink (it is not restarted: it held rows no other sink has) died: {why}; finished shards are "
            "kept: rerun the same command to resume"
        ) from None
    if not done:
        return progress_batch([])
    return {c: np.concatenate([d[c] for d in done]) for c in PROGRESS_COLUMNS}
