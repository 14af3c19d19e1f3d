"""Blocks that stay whole: how a group of rows goes from the read stage to the sink as one unit.

Ray Data reshapes the blocks a stage emits: it merges small ones and slices large ones at row
boundaries, by size. A read task's block is one forward pass of one shape (stages/grouper.py); cut in
two, it would be two passes, and merged with a whole shard it would be one decode task for the
shard. So between the read stage and the sink each block travels as one Ray row (`PACKED`: the
block's numpy columns, pickled), and the job's blocks are one such row each (`ONE_ROW_BLOCKS`):
every block Ray hands a stage is exactly one block a stage made. The stages themselves see the
ordinary columns (stages/rows.py): `per_block` unpacks each block, calls the stage, and packs its output.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa

PACKED = "packed"
PACKED_SCHEMA = pa.schema([(PACKED, pa.binary())])
# DataContext.target_max_block_size for the job: any block of more than one row is sliced into
# one-row blocks, and none is merged with another (bench/cluster.py counts the passes).
ONE_ROW_BLOCKS = 1


def pack(batch: dict) -> bytes:
    return pickle.dumps(batch, protocol=5)


def packed_table(table: pa.Table) -> pa.Table:
    """A read stage's Arrow block as one packed row of its numpy columns."""
    cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    return pa.Table.from_arrays([pa.array([pack(cols)], pa.binary())], schema=PACKED_SCHEMA)


def unpack(batch: dict) -> list:
    """The blocks (column dicts) in a batch of packed rows."""
    return [pickle.loads(b) for b in batch[PACKED]]


def per_block(fn, batch: dict, **kwargs) -> dict:
    """fn(block, **kwargs) for each packed block of `batch`, packed again, one row each."""
    out = np.empty(len(batch[PACKED]), dtype=object)
    out[:] = [pack(fn(block, **kwargs)) for block in unpack(batch)]
    return {PACKED: out}


def concat(blocks: list) -> dict:
    """Several blocks' columns as one batch (the sink stage splits by output, not by block)."""
    if len(blocks) == 1:
        return blocks[0]
    out = {}
    for k in blocks[0]:
        pieces = [b[k] for b in blocks]
        if any(p.dtype == object for p in pieces):
            col = np.empty(sum(len(p) for p in pieces), dtype=object)
            col[:] = [v for p in pieces for v in p]
            out[k] = col
        else:
            out[k] = np.concatenate(pieces)
    return out
