"""Stage 1: read raw bytes from tar shards and image folders as a streaming Ray dataset.

Every row carries its sequence id (`seq`), its output file (`out`), unit and position, and
its raw bytes; nothing is decoded here. A tar, local or in a bucket, is streamed member by
member (never held in memory, never downloaded whole) and ends with one END row (rows.UnitEnd)
that says how many samples the shard had and why reading stopped, so the sink knows what the
shard owes it without a counting pass. What cannot be read fails the task; what is read but is
not a tar, or ends early, is data and is recorded in the END row.
"""

from __future__ import annotations

import os
import tarfile
import time
from dataclasses import replace
from typing import Iterator, Optional

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ilias_ray.errors import UserError
from ilias_ray.plan_types import Source, Unit, escape_id
from ilias_ray.stages.blocks import PACKED_SCHEMA, packed_table
from ilias_ray.stages.grouper import Grouper
from ilias_ray.stages.rows import State, UnitEnd
from ilias_ray.storage.retry import Retries, backoff

FOLDER_TASK_ROWS = 256  # folder files per read task
SHARD_ATTEMPTS = 3  # reads of a shard from its start, when a read keeps failing part-way
# The largest image member read into memory (YFCC100M's JPEGs are well under 1 MiB; Pillow's pixel
# limit is reached by far smaller files). A larger one is a recorded skip; its bytes, like those of
# every member that is not a sample's image, are passed over by the tar stream, never held.
MAX_MEMBER_BYTES = 64 << 20


def split_member(name: str):
    """(key, extension) of a tar member: key is the name up to the first '.' of its base name."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def read_tar(unit: Unit, selected, grouper=None) -> Iterator[pa.Table]:
    """Stream one shard: one row per sample (image or skip), then one END row (rows.UnitEnd).

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
    as file system paths. A key the shard repeats gives one row per occurrence; the END row lists
    such IDs. A tar that is not one, or ends early, is data: the END row records why."""
    pos = 0
    ended = "eof"
    seen, repeated, repeated_ids = set(), set(), []

    def emit(key, members, offset, missing="no jpg member in sample") -> list:
        """The sample's row; the blocks it makes ready."""
        nonlocal pos
        raw = f"{unit.name}/{key}"
        if selected is not None and key not in selected and raw not in selected:
            return []
        if key in seen and key not in repeated:
            repeated.add(key)
            repeated_ids.append(escape_id(raw))
        seen.add(key)
        if isinstance(members.get("jpg"), int):  # its size: too large to read
            why = f"image member too large: {members['jpg']} bytes, over {MAX_MEMBER_BYTES}"
            ready = rows.add(pos, escape_id(raw), State.SKIPPED, reason=why, offset=offset)
        elif "jpg" in members:
            ready = rows.add(pos, escape_id(raw), State.BYTES, data=members["jpg"], offset=offset)
        else:
            ready = rows.add(pos, escape_id(raw), State.SKIPPED, reason=missing, offset=offset)
        pos += 1
        return ready

    key, members, offset = None, {}, 0
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
                            yield from emit(key, members, offset)
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
                    offset = m.offset_data + m.size
                if key is not None:
                    yield from emit(key, members, offset)
                key = None
        except (tarfile.TarError, EOFError) as e:
            # Keep what came before; the END row records why the shard ended early.
            started = pos > 0 or key is not None
            ended = f"{'truncated' if started else 'not a tar'}: {type(e).__name__}: {e}"
            if key is not None:  # the sample being read when the shard broke: its jpg if complete
                yield from emit(key, members, offset, missing="shard truncated inside this sample")
    end = UnitEnd(pos, ended, tuple(repeated_ids), Retries.count - retried)
    yield from rows.add(pos, "", State.END, offset=unit.size, end=end)
    yield from rows.finish()


def read_folder(unit: Unit, start: int, grouper=None) -> Iterator[pa.Table]:
    """Read the unit's files; `start` is the position of its first item in the output.

    A file the plan found missing (with --skip_missing) is a recorded skip; a file that cannot be
    read now fails the task with one line naming it."""
    rows = grouper(unit) if grouper else Grouper(unit)
    for pos, (id_, rel, boxes) in enumerate(unit.items, start):
        if rel is None:
            yield from rows.add(pos, id_, State.SKIPPED, reason="file not found")
        else:
            yield from rows.add(pos, id_, State.BYTES, data=(unit.src / rel).read_bytes(), boxes=boxes)
    if unit.items:
        yield from rows.finish()


def packed(tables) -> Iterator[pa.Table]:
    """A read task's blocks as Ray sees them: one packed row each (stages/blocks.py)."""
    for t in tables:
        yield packed_table(t)


def shared_keys(selected):
    """What a read task filters by: the --selected_ids keys themselves, or, passed as an ObjectRef
    (job/dataset.build_dataset puts them in the object store once), the object it refers to."""
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
        return sum(1 if u.source == Source.TAR else -(-len(u.items) // FOLDER_TASK_ROWS) for u in self.todo())

    def estimate_inmemory_data_size(self) -> Optional[int]:
        return sum(u.size for u in self.todo()) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list:
        tasks, sel, g = [], self.selected, self.grouper
        for u in self.todo():
            if u.source == Source.TAR:
                meta = BlockMetadata(num_rows=None, size_bytes=u.size, input_files=[str(u.src)], exec_stats=None)
                tasks.append(ReadTask(lambda u=u: packed(read_tar(u, shared_keys(sel), g)), meta, schema=PACKED_SCHEMA))
                continue
            for start in range(0, len(u.items), FOLDER_TASK_ROWS):
                # Each task gets only its slice of the file list.
                piece = replace(u, items=u.items[start : start + FOLDER_TASK_ROWS])
                meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
                tasks.append(
                    ReadTask(lambda p=piece, a=start: packed(read_folder(p, a, g)), meta, schema=PACKED_SCHEMA)
                )
        return tasks
