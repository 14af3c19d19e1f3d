"""The rows that flow between the stages: what kind each row is, and which columns each stage
needs and adds.

read -> decode -> embed -> sink. Every row keeps its routing columns (ROUTING) from the read to
the sink: `seq` (unit << 32 | position), the output file, the unit and position, the ID, the kind,
a note and the shard's byte offset. Each stage checks its input batch against its declaration at
its boundary (`Stage.check`), so a stage wired to the wrong input fails at once with an error that
names the stage, not with a KeyError deep inside it. The README's table of columns is checked
against these declarations (tests/test_rows.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import pyarrow as pa


class Kind(IntEnum):
    """What a row is. Stored as int8 in Arrow and numpy; compares equal to its value."""

    TAR_IMAGE = 0  # image bytes from a tar shard: no EXIF transposition (spec 3)
    FILE_IMAGE = 1  # image bytes from a folder file: EXIF transposed
    TEXT = 2  # a text query's UTF-8 bytes
    SKIP = 3  # an input with no row in the output; `note` says why
    MARKER = 4  # the end of a shard: `pos` is its sample count, `note` how it ended
    IMAGE = 5  # decoded pixels, ready for the model


ROUTING = ("seq", "out", "unit", "pos", "id", "kind", "note", "off")

# What a read task emits (Arrow), in this order.
READ_SCHEMA = pa.schema(
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
    "duplicates": np.int64,
    "retries": np.int64,
}

READ = Stage("read", needs=(), adds=tuple(READ_SCHEMA.names))
DECODE = Stage("decode", needs=ROUTING + ("data", "boxes"), adds=("img", "h", "w", "mask"), drops=("boxes",))
EMBED = Stage(
    "embed",
    needs=ROUTING + ("data", "img", "h", "w", "mask"),
    adds=("feat", "nvec"),
    drops=("data", "img", "h", "w", "mask"),
)
SINK = Stage(
    "sink",
    needs=ROUTING + ("feat", "nvec"),
    adds=tuple(c for c in PROGRESS_COLUMNS if c != "out"),
    drops=tuple(c for c in ROUTING if c != "out") + ("feat", "nvec"),
)
STAGES = (READ, DECODE, EMBED, SINK)  # in data-flow order
