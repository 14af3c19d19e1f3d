"""Sink-stage input built by hand (tests and benches): rows as the model stage hands them on."""

from __future__ import annotations

import numpy as np

from ilias_ray.plan_types import Source
from ilias_ray.stages.rows import NO_FEATURES, State, UnitEnd, object_column, seq_id


def sink_batch(rows, dim: int = 8, dtype=np.float16, out: int = 0) -> dict:
    """A batch of sink-stage rows. `rows`: (unit, pos, state) each, state one of FEATURES (a
    vector whose first value is unit * 1000 + pos), SKIPPED (reason "bad") or END (the unit owes
    `pos` rows and ended at eof). IDs are "s{unit}/{pos}"."""
    feats = [np.full((1, dim), u * 1000 + p, dtype) if s == State.FEATURES else NO_FEATURES for u, p, s in rows]
    return routed(
        len(rows),
        seq=np.array([seq_id(u, p) for u, p, _ in rows], np.int64),
        out=np.full(len(rows), out, np.int32),
        unit=np.array([u for u, _, _ in rows], np.int32),
        pos=np.array([p for _, p, _ in rows], np.int64),
        id=object_column([f"s{u}/{p}" for u, p, _ in rows]),
        state=np.array([s for _, _, s in rows], np.int8),
        reason=object_column(["bad" if s == State.SKIPPED else "" for _, _, s in rows]),
        unit_end=object_column([UnitEnd(p).cell() if s == State.END else None for _, p, s in rows]),
        feat=object_column(feats),
    )


def routed(n: int, **columns) -> dict:
    """A batch of `n` rows with every routing column (rows.ROUTING) at a default (positions 0..n-1
    of unit 0, from a tar, as read), then `columns` added or replacing them."""
    batch = {
        "seq": np.array([seq_id(0, p) for p in range(n)], np.int64),
        "out": np.zeros(n, np.int32),
        "unit": np.zeros(n, np.int32),
        "pos": np.arange(n, dtype=np.int64),
        "id": object_column([f"r{i}" for i in range(n)]),
        "source": np.full(n, Source.TAR, np.int8),
        "state": np.full(n, State.BYTES, np.int8),
        "reason": object_column([""] * n),
        "offset": np.zeros(n, np.int64),
        "unit_end": object_column([None] * n),
    }
    batch.update(columns)
    return batch
