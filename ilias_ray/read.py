"""Stage 1: read raw bytes from tar shards and image folders as a streaming Ray dataset.

Every row carries its sequence id (`seq`), its output file (`out`), unit and position, and
its raw bytes; nothing is decoded here. A tar, local or in a bucket, is streamed member by
member (never held in memory, never downloaded whole) and ends with one MARKER row that says
how many samples the shard had and why reading stopped, so the sink knows what the shard owes
it without a counting pass. What cannot be read fails the task; what is read but is not a tar,
or ends early, is data and is recorded in the marker.
"""

from __future__ import annotations

import json
import os
import tarfile
import time
from typing import Iterator, Optional

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ilias_ray.config import UserError
from ilias_ray.plan import Unit, escape_id, seq_id
from ilias_ray.rows import READ_SCHEMA, Kind
from ilias_ray.storage import Retries, backoff

BLOCK_ROWS = 64  # rows per block: a few MB of JPEGs, small enough to stream
FOLDER_TASK_ROWS = 256  # folder files per read task
SHARD_ATTEMPTS = 3  # reads of a shard from its start, when a read keeps failing part-way
# The largest image member read into memory (YFCC100M's JPEGs are well under 1 MiB; Pillow's pixel
# limit is reached by far smaller files). A larger one is a recorded skip; its bytes, like those of
# every member that is not a sample's image, are passed over by the tar stream, never held.
MAX_MEMBER_BYTES = 64 << 20


class _Rows:
    """Column buffer that flushes to Arrow tables of at most BLOCK_ROWS rows.

    After `restart()` (the shard is read again from its start), rows at positions this task has
    already sent downstream are not sent again."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.cols = {name: [] for name in READ_SCHEMA.names}
        self.sent = 0  # positions below this are already in tables handed out
        self.floor = 0  # rows below this position are dropped (sent by an earlier attempt)

    def add(self, pos, id_, kind, data=b"", note="", off=0, boxes=""):
        if pos < self.floor:
            return
        c = self.cols
        c["seq"].append(seq_id(self.unit.uid, pos))
        c["out"].append(self.unit.out)
        c["unit"].append(self.unit.uid)
        c["pos"].append(pos)
        c["id"].append(id_)
        c["kind"].append(kind)
        c["data"].append(data)
        c["note"].append(note)
        c["off"].append(off)
        c["boxes"].append(boxes)

    def full(self) -> bool:
        return len(self.cols["seq"]) >= BLOCK_ROWS

    def take(self) -> pa.Table:
        if self.cols["pos"]:
            self.sent = max(self.sent, self.cols["pos"][-1] + 1)
        table = pa.Table.from_pydict(self.cols, schema=READ_SCHEMA)
        self.cols = {name: [] for name in READ_SCHEMA.names}
        return table

    def restart(self) -> None:
        self.cols = {name: [] for name in READ_SCHEMA.names}
        self.floor = self.sent

    def __len__(self):
        return len(self.cols["seq"])


def split_member(name: str):
    """(key, extension) of a tar member: key is the name up to the first '.' of its base name."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def marker_note(end: str, duplicates: list, retries: int = 0) -> str:
    """A MARKER row's note: why the shard ended, the IDs it holds more than once, and how many
    reads of it were retried."""
    return json.dumps({"end": end, "duplicates": duplicates, "retries": retries})


def read_tar(unit: Unit, selected) -> Iterator[pa.Table]:
    """Stream one shard: one row per sample (image or skip), then one MARKER row.

    A shard that cannot be read fails the task with one line naming it; one whose reads keep
    failing part-way (after each range's own retries) is read again from its start, and the rows
    already sent are not sent again (the sink would drop them anyway)."""
    rows = _Rows(unit)
    retried = Retries.count
    for attempt in range(1, SHARD_ATTEMPTS + 1):
        try:
            yield from _scan_tar(unit, selected, rows, retried)
            return
        except UserError as e:
            if not getattr(e, "transient", False) or attempt == SHARD_ATTEMPTS:
                raise UserError(f"{e}; finished shards are kept: rerun the same command to resume") from None
            Retries.add()
            time.sleep(backoff(attempt))
            rows.restart()


def _scan_tar(unit: Unit, selected, rows: _Rows, retried: int) -> Iterator[pa.Table]:
    """One pass over the shard. Member names are only split into key and extension, never used
    as file system paths. A key the shard repeats gives one row per occurrence; the marker lists
    such IDs. A tar that is not one, or ends early, is data: the marker records why."""
    pos = 0
    reason = "eof"
    seen, repeated, duplicates = set(), set(), []

    def emit(key, members, off, missing="no jpg member in sample"):
        nonlocal pos
        raw = f"{unit.name}/{key}"
        if selected is not None and key not in selected and raw not in selected:
            return
        if key in seen and key not in repeated:
            repeated.add(key)
            duplicates.append(escape_id(raw))
        seen.add(key)
        if isinstance(members.get("jpg"), int):  # its size: too large to read
            rows.add(
                pos,
                escape_id(raw),
                Kind.SKIP,
                off=off,
                note=f"image member too large: {members['jpg']} bytes, over {MAX_MEMBER_BYTES}",
            )
        elif "jpg" in members:
            rows.add(pos, escape_id(raw), Kind.TAR_IMAGE, data=members["jpg"], off=off)
        else:
            rows.add(pos, escape_id(raw), Kind.SKIP, note=missing, off=off)
        pos += 1

    key, members, off = None, {}, 0
    with unit.src.open_reader() as f:  # a read that fails raises UserError: not data, not caught here
        try:
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = split_member(m.name)
                    if k is None:
                        continue
                    if k != key or ext in members:  # a new sample, or the same key again
                        if key is not None:
                            emit(key, members, off)
                            if rows.full():
                                yield rows.take()
                        key, members = k, {}
                    # Only the image is read; other members are passed over unread, as is an image
                    # over the bound (its size stands for it). Tarfile still checks that each
                    # skipped member is all there, so a truncation is noticed as before.
                    if ext != "jpg":
                        members[ext] = None
                    elif m.size > MAX_MEMBER_BYTES:
                        members[ext] = m.size
                    else:
                        members[ext] = tf.extractfile(m).read()
                    off = m.offset_data + m.size
                if key is not None:
                    emit(key, members, off)
                key = None
        except (tarfile.TarError, EOFError) as e:
            # Keep what came before; the marker records why the shard ended early.
            started = pos > 0 or key is not None
            reason = f"{'truncated' if started else 'not a tar'}: {type(e).__name__}: {e}"
            if key is not None:  # the sample being read when the shard broke: its jpg if complete
                emit(key, members, off, missing="shard truncated inside this sample")
    note = marker_note(reason, duplicates, Retries.count - retried)
    rows.add(pos, f"{unit.name}/", Kind.MARKER, note=note, off=unit.size)
    yield rows.take()


def read_folder(unit: Unit, start: int) -> Iterator[pa.Table]:
    """Read the unit's files; `start` is the position of its first item in the output.

    A file the plan found missing (with --skip_missing) is a recorded skip; a file that cannot be
    read now fails the task with one line naming it."""
    rows = _Rows(unit)
    kind = Kind.TEXT if unit.kind == "text" else Kind.FILE_IMAGE
    for pos, (id_, rel, boxes) in enumerate(unit.items, start):
        if rel is None:
            rows.add(pos, id_, Kind.SKIP, note="file not found")
        else:
            rows.add(pos, id_, kind, data=(unit.src / rel).read_bytes(), boxes=boxes)
        if rows.full():
            yield rows.take()
    if len(rows):
        yield rows.take()


def shared_keys(selected):
    """What a read task filters by: the --selected_ids keys themselves, or, passed as an ObjectRef
    (pipeline.build_dataset puts them in the object store once), the object it refers to."""
    return ray.get(selected) if isinstance(selected, ray.ObjectRef) else selected


class IliasDatasource(Datasource):
    """One read task per tar shard, and one per FOLDER_TASK_ROWS folder files.

    `selected` (distractors' --selected_ids) should be an ObjectRef to a plan.KeySet: each tar
    task then carries the reference, not the keys (5M IDs pickled into 1,000 tasks cost minutes
    and gigabytes)."""

    def __init__(self, units: list, selected=None):
        super().__init__()
        self.units = units
        self.selected = selected

    def todo(self) -> list:
        return [u for u in self.units if u.record is None]  # units an earlier run finished are not read

    def num_tasks(self) -> int:
        return sum(1 if u.kind == "tar" else -(-len(u.items) // FOLDER_TASK_ROWS) for u in self.todo())

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(u.size for u in self.todo()) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        tasks, sel = [], self.selected
        for u in self.todo():
            if u.kind == "tar":
                meta = BlockMetadata(num_rows=None, size_bytes=u.size, input_files=[str(u.src)], exec_stats=None)
                tasks.append(ReadTask(lambda u=u: read_tar(u, shared_keys(sel)), meta, schema=READ_SCHEMA))
                continue
            for start in range(0, len(u.items), FOLDER_TASK_ROWS):
                # Each task gets only its slice of the file list.
                part = Unit(u.uid, u.out, u.kind, u.name, src=u.src, items=u.items[start : start + FOLDER_TASK_ROWS])
                meta = BlockMetadata(num_rows=len(part.items), size_bytes=None, input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda p=part, a=start: read_folder(p, a), meta, schema=READ_SCHEMA))
        return tasks
