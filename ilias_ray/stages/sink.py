"""Stage 4 (sink actors, on the driver's node): put rows back in order, and say how far each output is.

Each output file belongs to one sink actor: output `o` to sink `o % count` (`route` sends each
row there), so one output's rows always meet in one process, and more sinks take more rows per
second when many outputs are in flight (bench/scale.py).

Rows reach the sink out of order. Each unit (tar shard, or folder list) has its own cursor and
reorder buffer, and hands its in-order rows to its part writer (output/parts.py), so memory depends on
how far rows arrive out of order, not on how many rows a shard or chunk has, and a later shard
never waits in memory for an earlier one. A row is written exactly once: a resent copy (a retried
task) of a position already written or buffered is dropped. When a unit's END row has said how
many rows it owes (folder units: the plan says) and they are all written, the part is made
durable; when every unit of an output is, the output is assembled (output/assemble.py) and
published.
"""

from __future__ import annotations

import errno
from typing import Optional

import numpy as np
import ray

from ilias_ray.errors import UserError, one_line
from ilias_ray.output.assemble import assemble
from ilias_ray.output.parts import PartsStore, PartWriter
from ilias_ray.plan_types import Output, OutputFormat
from ilias_ray.stages.blocks import PACKED, concat, unpack
from ilias_ray.stages.rows import PROGRESS_COLUMNS, SINK, State, UnitEnd
from ilias_ray.testing import faults


class UnitRows:
    """One unit's reorder buffer: rows wait in `buffer` until every earlier position is written."""

    def __init__(self, writer: PartWriter, count: Optional[int]):
        self.writer = writer
        self.pos = 0  # the next position to write
        # How many rows it owes and how it ended: from the plan (folders), or its END row (tars).
        self.end: Optional[UnitEnd] = None if count is None else UnitEnd(count)
        self.buffer = {}  # pos -> (id, state, feat, reason)
        self.record = None  # set once the unit is durable

    @property
    def done(self) -> bool:
        return self.record is not None

    def drain(self) -> None:
        while not self.done:
            e = self.end
            if e is not None and self.pos >= e.count:
                self.record = self.writer.close(e.count, e.end, list(e.repeated_ids), e.retries)
                return
            row = self.buffer.pop(self.pos, None)
            if row is None:
                return
            id_, state, feat, reason = row
            faults.hit("sink_write")
            if state == State.SKIPPED:
                self.writer.skip(id_, reason)
            else:
                self.writer.add(id_, feat)
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
        "repeated_ids": sum(len(r.get("duplicates", [])) for r in records),  # the record's key
        "retries": sum(r.get("retries", 0) for r in records),
    }


def progress_batch(rows: list) -> dict:
    """Progress rows as the numpy batch the sink returns (PROGRESS_COLUMNS)."""
    return {k: np.array([r[k] for r in rows], dtype) for k, dtype in PROGRESS_COLUMNS.items()}


class OutputRows:
    """The rows of one output: a UnitRows per unit still to write, and the records of the others."""

    def __init__(self, output: Output, fmt: OutputFormat):
        self.output, self.fmt = output, fmt
        self.units = output.units
        self.dir = output.dir
        self.store = PartsStore(output.dir, output.name)
        self.cursors = {}  # uid -> (k, UnitRows)
        self.records = {}  # k -> the unit's completion record
        self.offsets = {}  # uid -> bytes of the shard read so far (progress)
        self.resent_dropped = 0  # rows received again (a retried task) and dropped
        self.finished = output.done
        if self.finished:
            return
        self.store.begin(output.settings)
        for k, u in enumerate(self.units):
            if u.record is not None:
                self.records[k] = u.record  # done by an earlier run
            else:
                self.cursors[u.uid] = (k, UnitRows(self.store.writer(k, fmt.dtype), u.count))
        self.offsets = {u.uid: 0 for u in self.units}

    # -- progress --
    def _live(self) -> list:
        return [c.writer for _, c in self.cursors.values() if not c.done]

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
    def add(self, uid, pos, id_, state, feat, reason, offset) -> None:
        _k, c = self.cursors[uid]
        if c.done or pos < c.pos or pos in c.buffer:
            self.resent_dropped += 1  # a retried task may resend rows: keep the first copy
            return
        self.offsets[uid] = max(self.offsets[uid], int(offset))
        c.buffer[pos] = (id_, state, feat, reason)

    def end_unit(self, uid, end: UnitEnd) -> None:
        _k, c = self.cursors[uid]
        c.end = end

    def drain(self) -> None:
        for k, c in self.cursors.values():
            if not c.done:
                c.drain()
                if c.done:
                    self.records[k] = c.record
        if not self.finished and len(self.records) == len(self.units):
            assemble(self.output, self.fmt, self.records, self.resent_dropped)
            self.finished = True


class Sink:
    """One sink actor: the outputs `o` with `o % count == index`. Returns progress rows.

    Also a Ray Data callable class (`count=1`, one actor: every output)."""

    def __init__(self, outputs: list, fmt: OutputFormat, index: int = 0, count: int = 1):
        self.writers = {o: OutputRows(output, fmt) for o, output in enumerate(outputs) if o % count == index}
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
            uid, state = int(batch["unit"][i]), int(batch["state"][i])
            if state == State.END:
                w.end_unit(uid, UnitEnd.of(batch["unit_end"][i]))
                continue
            pos, id_, offset = int(batch["pos"][i]), str(batch["id"][i]), batch["offset"][i]
            w.add(uid, pos, id_, state, batch["feat"][i], str(batch["reason"][i]), offset)
        for o in touched:
            self.writers[o].drain()
        return progress_batch([self.writers[o].progress(o) for o in sorted(touched)])


def route(batch: dict, sinks: list) -> dict:
    """The sink stage's task (Ray Data, a task pool): the rows of output `o` go to
    `sinks[o % len(sinks)]`; it waits for the sinks it called (so a slow sink holds the stage
    back: backpressure) and returns their progress rows. Takes packed blocks (stages/blocks.py) or
    plain rows."""
    if PACKED in batch:
        batch = concat(unpack(batch))
    if len(sinks) == 1:
        calls = [sinks[0].write.remote(batch)]
    else:
        owner = batch["out"] % len(sinks)
        calls = [sinks[int(k)].write.remote({c: v[owner == k] for c, v in batch.items()}) for k in np.unique(owner)]
    try:
        done = ray.get(calls)
    except ray.exceptions.RayActorError as e:
        why = one_line(e)[:200]
        raise UserError(
            f"the sink (it is not restarted: it held rows no other sink has) died: {why}; finished shards are "
            "kept: rerun the same command to resume"
        ) from None
    if not done:
        return progress_batch([])
    return {c: np.concatenate([d[c] for d in done]) for c in PROGRESS_COLUMNS}
