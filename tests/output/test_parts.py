"""The parts store on its own: a unit's part files and record, what counts as finished, reading back."""

from __future__ import annotations

import json

import numpy as np

from ilias_ray.output.parts import RECORD_FIELDS, PartsStore, finished_units
from ilias_ray.storage.location import Location

SETTINGS = {"x": 1}


def write_unit(store, k, rows, dim=4, dtype="float32"):
    """rows: id -> nvec (0: skipped). Vector values are the row's number."""
    w = store.writer(k, dtype)
    for i, (id_, nvec) in enumerate(rows):
        if nvec:
            w.add(id_, np.full((nvec, dim), i, dtype))
        else:
            w.skip(id_, f"bad {i}")
    return w.close(len(rows), "eof", [], 0)


def test_a_unit_is_published_with_its_record_last_and_reads_back_in_blocks(tmp_path):
    store = PartsStore(Location.of(str(tmp_path)), "f.hdf5")
    store.begin(SETTINGS)
    rows = [(f"id{i}", 0 if i % 5 == 3 else 1 + i % 2) for i in range(23)]
    record = write_unit(store, 0, rows)
    assert set(record) == set(RECORD_FIELDS)
    assert record["rows"] == 19 and record["skipped"] == 4 and record["dim"] == 4
    assert record["vectors"] == sum(n for _, n in rows)
    parts = tmp_path / "f.hdf5.parts"
    assert sorted(p.name for p in parts.iterdir()) == ["0.feat", "0.json", "0.rows", "meta.json"]
    assert json.loads((parts / "0.json").read_text()) == record
    assert record["feat_bytes"] == (parts / "0.feat").stat().st_size
    blocks = list(store.read(0, 4, "float32", rows=7))
    assert [len(b.ids) + len(b.skipped) for b in blocks] == [7, 7, 7, 2]  # bounded blocks, in order
    ids = [i for b in blocks for i in b.ids]
    assert ids == [r for r, n in rows if n]
    assert [s for b in blocks for s in b.skipped] == [(r, f"bad {i}") for i, (r, n) in enumerate(rows) if not n]
    vecs = np.concatenate([b.vectors for b in blocks])
    want = np.concatenate([np.full((n, 4), i, np.float32) for i, (_, n) in enumerate(rows) if n])
    np.testing.assert_array_equal(vecs, want)
    assert [n for b in blocks for n in b.nvec] == [n for _, n in rows if n]


def test_only_records_of_the_same_settings_with_matching_files_count(tmp_path):
    store = PartsStore(Location.of(str(tmp_path)), "f.hdf5")
    store.begin(SETTINGS)
    for k in range(3):
        write_unit(store, k, [("a", 1), ("b", 1)])
    assert sorted(finished_units(store.loc, SETTINGS)) == [0, 1, 2]
    assert finished_units(store.loc, {"x": 2}) == {}
    parts = tmp_path / "f.hdf5.parts"
    (parts / "1.rows").write_text((parts / "1.rows").read_text()[:-3])  # torn
    (parts / "2.feat").unlink()
    assert sorted(finished_units(store.loc, SETTINGS)) == [0]
    store.remove()
    assert not parts.exists() and finished_units(store.loc, SETTINGS) == {}
