"""Stage 1: read raw bytes from tar shards and image folders as a streaming Ray dataset.

Every row carries its sequence id (`seq`), its output file (`out`), unit and position, and
its raw bytes; nothing is decoded here. A tar is streamed member by member (never held in
memory) and ends with one MARKER row that says how many samples the shard had and why
reading stopped, so the sink knows what the shard owes it without a counting pass.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Iterator, Optional

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ilias_ray.plan import Unit, escape_id, seq_id

# Row kinds. Images from tars skip EXIF transposition; folder images apply it (spec 3).
TAR_IMAGE, FILE_IMAGE, TEXT, SKIP, MARKER, IMAGE = 0, 1, 2, 3, 4, 5

SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("out", pa.int32()),
        ("unit", pa.int32()),
        ("pos", pa.int64()),
        ("id", pa.string()),
        ("kind", pa.int8()),
        ("data", pa.binary()),
        ("note", pa.string()),
        ("off", pa.int64()),
        ("boxes", pa.string()),
    ]
)

BLOCK_ROWS = 64  # rows per block: a few MB of JPEGs, small enough to stream
FOLDER_TASK_ROWS = 256  # folder files per read task


class _Rows:
    """Column buffer that flushes to Arrow tables of at most BLOCK_ROWS rows."""

    def __init__(self, unit: Unit):
        self.unit = unit
        self.cols = {name: [] for name in SCHEMA.names}

    def add(self, pos, id_, kind, data=b"", note="", off=0, boxes=""):
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
        table = pa.Table.from_pydict(self.cols, schema=SCHEMA)
        self.cols = {name: [] for name in SCHEMA.names}
        return table

    def __len__(self):
        return len(self.cols["seq"])


def split_member(name: str):
    """(key, extension) of a tar member: key is the name up to the first '.' of its base name."""
    d, base = os.path.split(name)
    if "." not in base:
        return None, None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


def marker_note(end: str, duplicates: list) -> str:
    """A MARKER row's note: why the shard ended, and the IDs it holds more than once."""
    return json.dumps({"end": end, "duplicates": duplicates})


def read_tar(unit: Unit, selected: Optional[frozenset]) -> Iterator[pa.Table]:
    """Stream one shard: one row per sample (image or skip), then one MARKER row.

    Member names are only split into key and extension, never used as file system paths.
    A key the shard repeats gives one row per occurrence; the marker lists such IDs."""
    rows = _Rows(unit)
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
        if "jpg" in members:
            rows.add(pos, escape_id(raw), TAR_IMAGE, data=members["jpg"], off=off)
        else:
            rows.add(pos, escape_id(raw), SKIP, note=missing, off=off)
        pos += 1

    key, members, off = None, {}, 0
    try:
        with open(unit.path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
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
                data = tf.extractfile(m).read()
                members.setdefault(ext, data)
                off = m.offset_data + m.size
            if key is not None:
                emit(key, members, off)
            key = None
    except (tarfile.TarError, EOFError, OSError) as e:
        # Keep what came before; the marker records why the shard ended early.
        started = pos > 0 or key is not None
        reason = f"{'truncated' if started else 'not a tar'}: {type(e).__name__}: {e}"
        if key is not None:  # the sample being read when the shard broke: its jpg if complete
            emit(key, members, off, missing="shard truncated inside this sample")
    rows.add(pos, f"{unit.name}/", MARKER, note=marker_note(reason, duplicates), off=unit.size)
    yield rows.take()


def read_folder(unit: Unit, start: int) -> Iterator[pa.Table]:
    """Read the unit's files; `start` is the position of its first item in the output."""
    rows = _Rows(unit)
    kind = TEXT if unit.kind == "text" else FILE_IMAGE
    for pos, (id_, path, boxes) in enumerate(unit.items, start):
        try:
            with open(path, "rb") as f:
                data = f.read()
            rows.add(pos, id_, kind, data=data, boxes=boxes)
        except FileNotFoundError:
            rows.add(pos, id_, SKIP, note="file not found")
        except OSError as e:
            rows.add(pos, id_, SKIP, note=f"unreadable: {e.strerror or e}")
        if rows.full():
            yield rows.take()
    if len(rows):
        yield rows.take()


class IliasDatasource(Datasource):
    """One read task per tar shard, and one per FOLDER_TASK_ROWS folder files."""

    def __init__(self, units: list, selected: Optional[frozenset] = None):
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
                meta = BlockMetadata(num_rows=None, size_bytes=u.size, input_files=[u.path], exec_stats=None)
                tasks.append(ReadTask(lambda u=u: read_tar(u, sel), meta, schema=SCHEMA))
                continue
            for start in range(0, len(u.items), FOLDER_TASK_ROWS):
                # Each task gets only its slice of the file list.
                part = Unit(u.uid, u.out, u.kind, u.name, items=u.items[start : start + FOLDER_TASK_ROWS])
                meta = BlockMetadata(num_rows=len(part.items), size_bytes=None, input_files=None, exec_stats=None)
                tasks.append(ReadTask(lambda p=part, a=start: read_folder(p, a), meta, schema=SCHEMA))
        return tasks
