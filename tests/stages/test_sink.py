"""The sink on its own: reordering, bounded memory, durable units, atomic finish (no Ray needed)."""

from __future__ import annotations

import os
from dataclasses import replace

import h5py
import numpy as np
import pytest

from ilias_ray.output.parts import finished_units
from ilias_ray.plan_types import Output, OutputFormat, Source, Unit
from ilias_ray.stages.rows import State
from ilias_ray.stages.sink import Sink
from ilias_ray.storage.location import Location
from ilias_ray.testing.batches import sink_batch as batch

D = 8


SETTINGS = {"x": 1}


IMAGE, SKIP, END = State.FEATURES, State.SKIPPED, State.END


def spec(tmp_path, units):
    """units: (uid, name, items or None (a tar), size, record or None) each."""
    return Output(
        index=0,
        name="f.hdf5",
        dir=Location.of(str(tmp_path)),
        units=tuple(
            Unit(uid, 0, Source.TAR if items is None else Source.FOLDER, name, size=size, items=items or (), record=rec)
            for uid, name, items, size, rec in units
        ),
        settings=SETTINGS,
    )


RUN = OutputFormat(dtype="float16", compression=0, per_token=False)


def test_reorders_streams_and_finishes_atomically(tmp_path):
    n0, n1 = 5000, 300
    sink = Sink([spec(tmp_path, [(0, "a.tar", None, 0, None), (1, "b.tar", None, 0, None)])], RUN)
    w = sink.writers[0]
    rng = np.random.RandomState(0)
    rows = [(0, p, SKIP if p == 7 else IMAGE) for p in range(n0)] + [(1, p, IMAGE) for p in range(n1)]
    # Shuffle inside windows of 200 rows: out of order, as Ray delivers them.
    order = np.concatenate([rng.permutation(np.arange(s, min(s + 200, len(rows)))) for s in range(0, len(rows), 200)])
    # Shard 1 is complete early, shard 0 late: shard 1 is written to its part, not held in memory.
    sink(batch([(1, n1, END)]))
    peak = 0
    for s in range(0, len(order), 100):
        sink(batch([rows[i] for i in order[s : s + 100]]))
        peak = max(peak, sum(len(u.buffer) for _, u in w.cursors.values()))
        if s == 3000:
            assert w.cursors[0][1].pos > 2000  # shard 0's rows already streamed to its part file
            assert not (tmp_path / "f.hdf5").exists()
    assert peak <= 200  # bounded by how far rows arrive out of order, not by the chunk size
    assert 1 in w.records and not w.finished  # shard 1 is durable; the file waits for shard 0
    out = sink(batch([(0, n0, END)]))
    assert out["finished"].tolist() == [True]
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        idx = list(f["index"].asstr()[()])
        want = [f"s0/{p}" for p in range(n0) if p != 7] + [f"s1/{p}" for p in range(n1)]
        assert idx == want
        feats = f["features"][()]
        np.testing.assert_array_equal(
            feats[:, 0], np.array([int(i[1]) * 1000 + int(i.split("/")[1]) for i in idx], np.float16)
        )
        assert list(f["skipped_index"].asstr()[()]) == ["s0/7"]
        assert f.attrs["complete"] and f.attrs["num_rows"] == len(want)
    assert not (tmp_path / "f.hdf5.partial").exists() and not (tmp_path / "f.hdf5.parts").exists()


def test_a_new_sink_resumes_from_finished_units(tmp_path):
    units = [(0, "a.tar", None, 0, None), (1, "b.tar", None, 0, None), (2, "c.tar", None, 0, None)]
    first = Sink([spec(tmp_path, units)], RUN)
    first(batch([(0, p, IMAGE) for p in range(5)] + [(0, 5, END)]))
    first(batch([(2, p, IMAGE) for p in range(3)] + [(2, 3, END)]))
    first(batch([(1, 0, IMAGE)]))  # unit 1 is in flight when the run dies
    del first
    parts = Location.of(str(tmp_path)) / "f.hdf5.parts"
    records = finished_units(parts, SETTINGS)
    assert sorted(records) == [0, 2] and records[0]["rows"] == 5
    assert finished_units(parts, {"x": 2}) == {}  # other settings: start over
    resumed = [(u[0], u[1], u[2], u[3], records.get(k)) for k, u in enumerate(units)]
    second = Sink([spec(tmp_path, resumed)], RUN)
    second(batch([(1, p, IMAGE) for p in range(2)] + [(1, 2, END)]))
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        assert list(f["index"].asstr()[()]) == [f"s0/{p}" for p in range(5)] + ["s1/0", "s1/1"] + [
            f"s2/{p}" for p in range(3)
        ]


def test_duplicate_rows_are_dropped(tmp_path):
    sink = Sink([spec(tmp_path, [(0, "a", ((),) * 3, 0, None)])], RUN)
    sink(batch([(0, 0, IMAGE), (0, 1, IMAGE)]))
    sink(batch([(0, 1, IMAGE), (0, 0, IMAGE), (0, 2, IMAGE)]))
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        assert list(f["index"].asstr()[()]) == ["s0/0", "s0/1", "s0/2"]
        assert f.attrs["duplicates_dropped"] == 2
    assert not os.path.exists(tmp_path / "f.hdf5.parts")


def test_each_sink_owns_every_nth_output(tmp_path):
    """With N sinks, sink k writes the outputs o with o % N == k (stages/sink.route sends it their rows)
    and no other: another output's row is an error, never a second writer."""
    one = spec(tmp_path, [(0, "a.tar", None, 0, None)])
    outputs = [replace(one, name=f"f{o}.hdf5") for o in range(5)]
    sinks = [Sink(outputs, RUN, k, 2) for k in range(2)]
    assert [sorted(s.writers) for s in sinks] == [[0, 2, 4], [1, 3]]
    rows = batch([(0, 0, IMAGE), (0, 1, END)])
    for o in range(5):
        got = sinks[o % 2](dict(rows, out=np.full(2, o)))
        assert got["out"].tolist() == [o] and bool(got["finished"][0])
        with pytest.raises(KeyError):
            sinks[(o + 1) % 2](dict(rows, out=np.full(2, o)))
    assert sorted(p.name for p in tmp_path.glob("*.hdf5")) == [f"f{o}.hdf5" for o in range(5)]
