"""Blocks of whole forward passes: the read stage holds rows until a forward pass of one shape is
there (the shape read from the image header), within bounds of positions and bytes."""

from __future__ import annotations

import pyarrow as pa

from ilias_ray.plan_types import Unit
from ilias_ray.stages.rows import READ_SCHEMA, State, seq_id

BLOCK_ROWS = 64  # rows per block when nothing else is said: a few MB of JPEGs, small enough to stream


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
        self.shape_of = shape_of  # (data, source, boxes) of a row as read -> a hashable shape, or None
        self.group, self.window, self.hold_bytes = max(1, group), max(1, window), hold_bytes
        self.sent = set()  # positions already in blocks handed out
        self.restart()

    def restart(self) -> None:
        self.groups = {}  # shape -> rows, in the order of each group's oldest row
        self.loose = []  # rows that go with the next block
        self.held = 0  # image bytes in self.groups
        self.skip = set(self.sent)

    def add(self, pos, id_, state=State.BYTES, data=b"", reason="", offset=0, boxes="", end=None) -> list:
        """Take one row of this unit (READ_SCHEMA's columns; `end`: the UnitEnd of an END row);
        the blocks (Arrow tables) that are ready to leave now."""
        if pos in self.skip:
            return []
        u = self.unit
        cell = end.cell() if end is not None else None
        row = (seq_id(u.uid, pos), u.out, u.uid, pos, id_, u.source, state, reason, offset, cell, data, boxes)
        shape = self.shape_of(data, u.source, boxes) if self.shape_of and state == State.BYTES else None
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
