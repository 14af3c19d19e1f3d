"""stages/blocks.py: a block travels as one packed row and comes back the same; blocks concatenate."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ilias_ray.stages.blocks import PACKED, PACKED_SCHEMA, concat, pack, packed_table, per_block, unpack
from ilias_ray.stages.rows import object_column


def block(n, start=0):
    return {
        "pos": np.arange(start, start + n),
        "img": object_column([np.full((2, 3, 3), i, np.uint8) for i in range(n)]),
        "id": object_column([f"r{start + i}" for i in range(n)]),
    }


def test_a_block_is_one_packed_row_and_comes_back_whole():
    t = pa.table({"pos": pa.array([1, 2, 3]), "id": pa.array(["a", "b", "c"])})
    packed = packed_table(t)
    assert packed.schema == PACKED_SCHEMA and packed.num_rows == 1
    (back,) = unpack(packed.to_pydict())
    assert back["pos"].tolist() == [1, 2, 3] and back["id"].tolist() == ["a", "b", "c"]


def test_per_block_calls_the_stage_on_each_block_and_packs_its_output():
    batch = {PACKED: object_column([pack(block(2)), pack(block(3, 2))])}
    out = per_block(lambda b, k: dict(b, pos=b["pos"] * k), batch, k=10)
    got = unpack(out)
    assert [b["pos"].tolist() for b in got] == [[0, 10], [20, 30, 40]]


def test_concat_keeps_object_columns_one_value_per_row():
    both = concat([block(2), block(3, 2)])
    assert both["pos"].tolist() == [0, 1, 2, 3, 4] and both["img"].dtype == object and len(both["img"]) == 5
    assert all(both["img"][i].shape == (2, 3, 3) for i in range(5)) and both["id"].tolist()[-1] == "r4"
    one = block(1)
    assert concat([one]) is one
