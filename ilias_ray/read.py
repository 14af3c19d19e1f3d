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

from ilias_ray.blocks import PACKED_SCHEMA, packed_table
from ilias_ray.config import UserError
from ilias_ray.plan import Unit, escape_id, seq_id
from ilias_ray.rows import READ_SCHEMA, Kind
from ilias_ray.storage import Retries, backoff

BLOCK_ROWS = 64  # rows per block when nothing else is said: a few MB of JPEGs, small enough to stream
FOLDER_TASK_ROWS = 256  # folder files per read task
SHARD_ATTEMPTS = 3  # reads of a shard from its start, when a read keeps failing part-way
# The largest image member read into memory (YFCC100M's JPEGs are well under 1 MiB; Pillow's pixel
# limit is reached by far smaller files). A larger one is a recorded skip; its bytes, like those of
# every member that is not a sample's image, are passed over by the tar stream, never held.
MAX_MEMBER_BYTES = 64 << 20
# Grouping by shape (Grouper): a row waits for others of its shape at most HOLD_ROWS positions of
# its unit, and a read task holds at most HOLD_BYTES of image bytes. The first bounds the sink's
# reorder buffer per unit (rows after a held one wait there), the second the read task's memory.
HOLD_ROWS = 4096
HOLD_BYTES = 256 << 20

FIELDS = READ_SCHEMA.names
POS, DATA = FIELDS.index("pos"), FIELDS.index("data")


class Grouper:
    """A unit's rows, handed out as Arrow tables (blocks) whose image rows are grouped by the shape
    decoding will give them (`shape_of`, read from the image's header), so that each block the
    model stage gets is whole forward passes: a shape's block leaves when it has `group` rows
    (--batch_size, or --webdl_batch_size if smaller). Rows of rarer shapes wait for more of theirs,
    but never longer than `window` positions of the unit nor past `hold_bytes` held (the oldest
    groups leave first), and leave at once at the unit's end (`finish`), packed by shape into
    blocks of at most `group` rows without splitting a group. Rows that are not images, or whose
    shape the header does not tell, ride along with the next block that leaves. Each row keeps its
    sequence id: order is the sink's to restore, as for rows from different tasks.

    After `restart()` (the shard is read again from its start), rows at positions this task has
    already handed out are not handed out again."""

    def __init__(
        self, unit: Unit, shape_of=None, group: int = BLOCK_ROWS, window: int = HOLD_ROWS, hold_bytes: int = HOLD_BYTES
    ):
        self.unit = unit
        self.shape_of = shape_of  # (data, kind, boxes) -> a hashable shape, or None
        self.group, self.window, self.hold_bytes = max(1, group), max(1, window), hold_bytes
        self.sent = set()  # positions already in blocks handed out
        self.restart()

    def restart(self) -> None:
        self.groups = {}  # shape -> rows, in the order of each group's oldest row
        self.loose = []  # rows that go with the next block
        self.held = 0  # image bytes in self.groups
        self.skip = set(self.sent)

    def add(self, pos, id_, kind, data=b"", note="", off=0, boxes="") -> list:
        """Take one row; the blocks (Arrow tables) that are ready to leave now."""
        if pos in self.skip:
            return []
        row = (seq_id(self.unit.uid, pos), self.unit.out, self.unit.uid, pos, id_, kind, data, note, off, boxes)
        shape = self.shape_of(data, kind, boxes) if self.shape_of and kind != Kind.SKIP else None
        if shape is None:
            self.loose.append(row)
            return [self._block([])] if len(self.loose) >= self.group else []
        rows = self.groups.setdefault(shape, [])
        rows.append(row)
        self.held += len(data)
        ready = []
        if len(rows) >= self.group:
            ready.append(self._block(self._pop(shape)))
        due = []
        while self.groups and (pos - self._oldest() >= self.window or self.held > self.hold_bytes):
            due.append(self._pop(next(iter(self.groups))))
        ready.extend(self._pack(due))
        return ready

    def finish(self) -> list:
        """Every row still held, as blocks (groups packed by shape); the last one takes the loose rows."""
        due = [self._pop(k) for k in sorted(self.groups, key=str)]
        blocks = self._pack(due)
        if self.loose:
            blocks.append(self._block([]))
        return blocks

    def _oldest(self) -> int:
        return next(iter(self.groups.values()))[0][POS]

    def _pop(self, shape) -> list:
        rows = self.groups.pop(shape)
        self.held -= sum(len(r[DATA]) for r in rows)
        return rows

    def _pack(self, groups: list) -> list:
        """Whole groups (each under `group` rows) into blocks of at most `group` rows."""
        blocks, cur = [], []
        for rows in groups:
            if cur and len(cur) + len(rows) > self.group:
                blocks.append(self._block(cur))
                cur = []
            cur.extend(rows)
        if cur:
            blocks.append(self._block(cur))
        return blocks

    def _block(self, rows: list) -> pa.Table:
        rows = rows + self.loose
        self.loose = []
        self.sent.update(r[POS] for r in rows)
        cols = list(zip(*rows)) if rows else [[] for _ in FIELDS]
        return pa.Table.from_arrays(
            [pa.array(c, type=READ_SCHEMA.field(i).type) for i, c in enumerate(cols)], schema=READ_SCHEMA
        )


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


def read_tar(unit: Unit, selected, grouper=None) -> Iterator[pa.Table]:
    """Stream one shard: one row per sample (image or skip), then one MARKER row.

    A shard that cannot be read fails the task with one line naming it; one whose reads keep
    failing part-way (after each range's own retries) is read again from its start, and the rows
    already sent are not sent again (the sink would drop them anyway)."""
    rows = grouper(unit) if grouper else Grouper(unit)
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


def _scan_tar(unit: Unit, selected, rows: Grouper, retried: int) -> Iterator[pa.Table]:
    """One pass over the shard. Member names are only split into key and extension, never used
    as file system paths. A key the shard repeats gives one row per occurrence; the marker lists
    such IDs. A tar that is not one, or ends early, is data: the marker records why."""
    pos = 0
    reason = "eof"
    seen, repeated, duplicates = set(), set(), []

    def emit(key, members, off, missing="no jpg member in sample") -> list:
        """The sample's row; the blocks it makes ready."""
        nonlocal pos
        raw = f"{unit.name}/{key}"
        if selected is not None and key not in selected and raw not in selected:
            return []
        if key in seen and key not in repeated:
            repeated.add(key)
            duplicates.append(escape_id(raw))
        seen.add(key)
        if isinstance(members.get("jpg"), int):  # its size: too large to read
            ready = rows.add(
                pos,
                escape_id(raw),
                Kind.SKIP,
                off=off,
                note=f"image member too large: {members['jpg']} bytes, over {MAX_MEMBER_BYTES}",
            )
        elif "jpg" in members:
            ready = rows.add(pos, escape_id(raw), Kind.TAR_IMAGE, data=members["jpg"], off=off)
        else:
            ready = rows.add(pos, escape_id(raw), Kind.SKIP, note=missing, off=off)
        pos += 1
        return ready

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
                            yield from emit(key, members, off)
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
                    yield from emit(key, members, off)
                key = None
        except (tarfile.TarError, EOFError) as e:
            # Keep what came before; the marker records why the shard ended early.
            started = pos > 0 or key is not None
            reason = f"{'truncated' if started else 'not a tar'}: {type(e).__name__}: {e}"
            if key is not None:  # the sample being read when the shard broke: its jpg if complete
                yield from emit(key, members, off, missing="shard truncated inside this sample")
    note = marker_note(reason, duplicates, Retries.count - retried)
    yield from rows.add(pos, f"{unit.name}/", Kind.MARKER, note=note, off=unit.size)
    yield from rows.finish()


def read_folder(unit: Unit, start: int, grouper=None) -> Iterator[pa.Table]:
    """Read the unit's files; `start` is the position of its first item in the output.

    A file the plan found missing (with --skip_missing) is a recorded skip; a file that cannot be
    read now fails the task with one line naming it."""
    rows = grouper(unit) if grouper else Grouper(unit)
    kind = Kind.TEXT if unit.kind == "text" else Kind.FILE_IMAGE
    for pos, (id_, rel, boxes) in enumerate(unit.items, start):
        if rel is None:
            yield from rows.add(pos, id_, Kind.SKIP, note="file not found")
        else:
            yield from rows.add(pos, id_, kind, data=(unit.src / rel).read_bytes(), boxes=boxes)
    if unit.items:
        yield from rows.finish()


def packed(tables) -> Iterator[pa.Table]:
    """A read task's blocks as Ray sees them: one packed row each (blocks.py)."""
    for t in tables:
        yield packed_table(t)


def shared_keys(selected):
    """What a read task filters by: the --selected_ids keys themselves, or, passed as an ObjectRef
    (pipeline.build_dataset puts them in the object store once), the object it refers to."""
    return ray.get(selected) if isinstance(selected, ray.ObjectRef) else selected


class IliasDatasource(Datasource):
    """One read task per tar shard, and one per FOLDER_TASK_ROWS folder files.

    `selected` (distractors' --selected_ids) should be an ObjectRef to a plan.KeySet: each tar
    task then carries the reference, not the keys (5M IDs pickled into 1,000 tasks cost minutes
    and gigabytes). `grouper(unit)` makes the Grouper that shapes a task's blocks (default: rows
    in blocks of BLOCK_ROWS, in order)."""

    def __init__(self, units: list, selected=None, grouper=None):
        super().__init__()
        self.units = units
        self.selected = selected
        self.grouper = grouper

    def todo(self) -> list:
        return [u for u in self.units if u.record is None]  # units an earlier run finished are not read

    def num_tasks(self) -> int:
        return sum(1 if u.kind == "tar" else -(-len(u.items) // FOLDER_TASK_ROWS) for u in self.todo())

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(u.size for u in self.todo()) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        tasks, sel, g = [], self.selected, self.grouper
        for u in self.todo():
            if u.kind == "tar":
                meta = BlockMetadata(num_rows=None, size_bytes=u.size, input_files=[str(u.src)], exec_stats=None)
                tasks.append(ReadTask(lambda u=u: packed(read_tar(u, shared_keys(sel), g)), meta, schema=PACKED_SCHEMA))
                continue
            for start in range(0, len(u.items), FOLDER_TASK_ROWS):
                # Each task gets only its slice of the file list.
                part = Unit(u.uid, u.out, u.kind, u.name, src=u.src, items=u.items[start : start + FOLDER_TASK_ROWS])
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda p=part, a=start: packed(read_folder(p, a, g)), meta, schema=PACKED_SCHEMA))
        return tasks
