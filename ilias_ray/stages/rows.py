"""The rows that flow between the stages: where each row came from, what it is now, and which
columns each stage needs and adds.

read -> decode -> embed -> sink. Every row keeps its routing columns (ROUTING) from the read to
the sink: `seq` (unit << 32 | position), the output file, the unit and position, the ID, where it
came from (`source`, plan_types.Source: a tar, a folder, a text file; it never changes), what it is
now (`state`: State), why it has no features (`reason`, for SKIPPED rows), how far into its shard
reading was (`offset`, bytes: progress), and, on a unit's END row only, how the unit ended
(`unit_end`: UnitEnd, encoded and decoded here and nowhere else). Each stage checks its input
batch against its declaration at its boundary (`Stage.check`), so a stage wired to the wrong
input fails at once with an error that names the stage, not with a KeyError deep inside it. The
column table of ARCHITECTURE.md is checked against these declarations (tests/stages/test_rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Optional

import numpy as np
import pyarrow as pa


class State(IntEnum):
    """What a row is now. Stored as int8 in Arrow and numpy; compares equal to its value."""

    BYTES = 0  # as read: an image's file bytes, or a text query's UTF-8 (texts stay so until the model)
    PIXELS = 1  # decoded, cropped and resized: uint8 pixels for the model
    SKIPPED = 2  # an input with no row in the output; `reason` says why
    END = 3  # the end of a unit (a tar shard): `unit_end` says how many rows it owes and how it ended
    FEATURES = 4  # embedded: `feat` holds its vectors


@dataclass(frozen=True)
class UnitEnd:
    """How a tar shard ended, carried by its END row (read stage -> sink): the samples it holds
    (positions 0..count-1, rows and skips), why reading stopped ("eof", "truncated: ..." or "not a
    tar: ..."), the IDs it holds more than once, and how many reads of it were retried."""

    count: int
    end: str = "eof"
    repeated_ids: tuple = ()
    retries: int = 0

    ARROW = pa.struct(
        [
            ("count", pa.int64()),
            ("end", pa.string()),
            ("repeated_ids", pa.list_(pa.string())),
            ("retries", pa.int32()),
        ]
    )

    def cell(self) -> dict:
        """This end as the `unit_end` column's value."""
        return {"count": self.count, "end": self.end, "repeated_ids": list(self.repeated_ids), "retries": self.retries}

    @classmethod
    def of(cls, cell) -> Optional["UnitEnd"]:
        """The UnitEnd in a `unit_end` value (None on rows that are not an END row)."""
        if cell is None:
            return None
        return cls(int(cell["count"]), str(cell["end"]), tuple(cell["repeated_ids"]), int(cell["retries"]))


ROUTING = ("seq", "out", "unit", "pos", "id", "source", "state", "reason", "offset", "unit_end")

# What a read task emits (Arrow), in this order.
READ_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("out", pa.int32()),
        ("unit", pa.int32()),
        ("pos", pa.int64()),
        ("id", pa.string()),
        ("source", pa.int8()),
        ("state", pa.int8()),
        ("reason", pa.string()),
        ("offset", pa.int64()),
        ("unit_end", UnitEnd.ARROW),
        ("data", pa.binary()),
        ("boxes", pa.string()),
    ]
)


class StageInputError(ValueError):
    """A batch reached a stage without the columns that stage needs: the stages are mis-wired."""


@dataclass(frozen=True)
class Stage:
    """One stage's contract: the columns it reads from its input, the ones it adds, and the ones
    of its input it does not pass on."""

    name: str
    needs: tuple
    adds: tuple
    drops: tuple = ()

    def check(self, batch) -> None:
        """Raise StageInputError, naming this stage, if `batch` lacks a column it needs."""
        missing = [c for c in self.needs if c not in batch]
        if missing:
            raise StageInputError(
                f"stage {self.name!r} got a batch without column(s) {', '.join(missing)} "
                f"(it has: {', '.join(sorted(batch)) or 'none'})"
            )

    def output(self, given: tuple) -> tuple:
        """The columns this stage emits when its input has `given`."""
        return tuple(c for c in given if c not in self.drops) + tuple(c for c in self.adds if c not in given)


# What the sink emits: one progress row per output file it touched, for the driver.
PROGRESS_COLUMNS = {
    "out": np.int32,
    "rows": np.int64,
    "skipped": np.int64,
    "fraction": np.float64,
    "finished": bool,
    "truncated": np.int64,
    "repeated_ids": np.int64,
    "retries": np.int64,
}

READ = Stage("read", needs=(), adds=tuple(READ_SCHEMA.names))
DECODE = Stage("decode", needs=ROUTING + ("data", "boxes"), adds=("img", "mask"), drops=("boxes",))
# `feat`: each row's vectors, a (vectors, dim) array in the stored dtype: one vector (global
# pooling), one per token (--pooling local), none (0, 0) for rows without features.
EMBED = Stage("embed", needs=ROUTING + ("data", "img", "mask"), adds=("feat",), drops=("data", "img", "mask"))
SINK = Stage(
    "sink",
    needs=ROUTING + ("feat",),
    adds=tuple(c for c in PROGRESS_COLUMNS if c != "out"),
    drops=tuple(c for c in ROUTING if c != "out") + ("feat",),
)
STAGES = (READ, DECODE, EMBED, SINK)  # in data-flow order

NO_FEATURES = np.zeros((0, 0), np.float32)  # `feat` of a row without features


def object_column(items: list) -> np.ndarray:
    """A 1-D object array of `items` (np.array would try to stack equal-shaped arrays): how pixels
    and features travel, one array per row, whatever their shapes."""
    col = np.empty(len(items), dtype=object)
    col[:] = items
    return col


def seq_id(unit: int, pos: int) -> int:
    """A row's sequence id: sorts exactly like the required output order."""
    return (unit << 32) | pos
