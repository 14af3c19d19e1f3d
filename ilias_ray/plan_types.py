"""The plan's one type set: the outputs a run writes, the units each is read from, the format they
share, and the distractor key set. The planner makes them; the read stage, the sink, the commit
step and the driver take them as they are."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Optional

import numpy as np

from ilias_ray.storage.location import Location


def escape_id(path: str) -> str:
    """ASCII-escape an ID the way the ILIAS reference does (identity for ASCII)."""
    return str(path.encode("unicode-escape")).replace("\\\\u", "#U").replace("\\\\x", "#U00")[2:-1]


class Source(IntEnum):
    """Where a unit's rows come from; each row carries it (`source`) from the read to the sink.
    Stored as int8; compares equal to its value."""

    TAR = 0  # members of a tar shard (distractors): no EXIF transposition (spec 3)
    FOLDER = 1  # image files in a folder (queries, positives, uned): EXIF transposed
    TEXT = 2  # text query files, UTF-8


@dataclass(frozen=True)
class Unit:
    """What one read task (or, for large folders, several) reads: one tar shard, or one list of
    folder files. Every row of a unit gets a position; `seq = uid << 32 | position`."""

    uid: int
    out: int  # the index of its output in Plan.outputs
    source: Source
    name: str  # shard file name, or the partition for folder units
    src: Optional[Location] = None  # the tar shard, or the dataset folder of folder/text items
    size: int = 0  # tar size in bytes (for progress); 0 for folder units
    items: tuple = ()  # folder/text: ((id, path below src or None if missing, boxes), ...)
    record: Optional[dict] = None  # the completion record of an earlier, interrupted run

    @property
    def count(self) -> Optional[int]:
        """Rows this unit owes its output, when known before reading (not for tars: their end
        row says)."""
        return None if self.source == Source.TAR else len(self.items)


@dataclass(frozen=True)
class Output:
    """One output file to write: where, its units in output order, and what it records."""

    index: int
    name: str
    dir: Location  # --hdf5_dir
    units: tuple  # its Units, in output order
    settings: dict  # what decides its numbers: recorded, and fingerprinted
    run_settings: dict = field(default_factory=dict)  # where and how it was made (credentials redacted)
    done: bool = False  # every unit was finished by an earlier run: the driver assembles it


@dataclass(frozen=True)
class OutputFormat:
    """What every output of a run shares (several partitions' outputs too)."""

    dtype: str  # of the vectors: float16 or float32
    compression: int  # gzip level, 0 for none
    per_token: bool  # --pooling local: several vectors a row (one per token), and an `offsets` dataset


@dataclass
class Plan:
    outputs: list  # Outputs to write now
    format: OutputFormat
    done: list = field(default_factory=list)  # names of outputs already complete with the same settings
    selected_keys: Optional["KeySet"] = None  # distractor key filter
    notes: list = field(default_factory=list)  # one line each, for the user, about skipped outputs

    @property
    def units(self) -> list:
        """Every unit of the outputs, in uid order (those with a record are not read again)."""
        return [u for o in self.outputs for u in o.units]


class KeySet:
    """The --selected_ids of a distractor run, as one sorted array of UTF-8 keys (numpy 'S' dtype).

    Exact membership by binary search. Unlike a set of str, it is one buffer: the driver puts it
    in Ray's object store once, and every read task maps it without copying, so a task's size and
    start-up cost do not grow with the list (mini-ILIAS lists 5M IDs, for 1,000 shards)."""

    def __init__(self, ids):
        encoded = [i.encode("utf-8") for i in ids]
        self.keys = np.unique(np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}"))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        b = key.encode("utf-8")
        if len(b) > self.keys.dtype.itemsize or not b or b.endswith(b"\0"):
            return False  # longer than every listed key ('S' would truncate it), or not storable
        i = int(np.searchsorted(self.keys, b))
        return i < len(self.keys) and bool(self.keys[i] == b)
