"""The sink on its own: reordering, bounded memory, durable units, atomic finish (no Ray needed)."""

from __future__ import annotations

import os
from dataclasses import replace

import h5py
import numpy as np
import pytest

from ilias_ray.hdf5_out import OutputSpec, RunInfo, UnitSpec
from ilias_ray.parts import finished_units
from ilias_ray.plan import seq_id
from ilias_ray.read import marker_note
from ilias_ray.rows import Kind
from ilias_ray.sink import Sink
from ilias_ray.storage import Location

D = 8
SETTINGS = {"x": 1}


def spec(tmp_path, units):
    """units: (uid, name, count or None, size, record or None) each."""
    return OutputSpec(
        name="f.hdf5", dir=Location.of(str(tmp_path)), settings=SETTINGS, units=tuple(UnitSpec(*u) for u in units)
    )


RUN = RunInfo(dtype="float16", compression=0, local=False)


def batch(rows):
    cols = {k: [] for k in ("seq", "out", "unit", "pos", "id", "kind", "note", "off", "feat", "nvec")}
    for unit, pos, kind in rows:
        cols["seq"].append(seq_id(unit, pos))
        cols["out"].append(0)
        cols["unit"].append(unit)
        cols["pos"].append(pos)
        cols["id"].append(f"s{unit}/{pos}")
        cols["kind"].append(kind)
        cols["note"].append("bad" if kind == Kind.SKIP else marker_note("eof", []) if kind == Kind.MARKER else "")
        cols["off"].append(0)
        cols["feat"].append(np.full(D, unit * 1000 + pos, np.float16).tobytes() if kind == Kind.IMAGE else b"")
        cols["nvec"].append(1 if kind == Kind.IMAGE else 0)
    return {k: np.array(v, dtype=object if k in ("id", "note", "feat") else None) for k, v in cols.items()}


def test_reorders_streams_and_finishes_atomically(tmp_path):
    n0, n1 = 5000, 300
    sink = Sink([spec(tmp_path, [(0, "a.tar", None, 0, None), (1, "b.tar", None, 0, None)])], RUN)
    w = sink.writers[0]
    rng = np.random.RandomState(0)
    rows = [(0, p, Kind.SKIP if p == 7 else Kind.IMAGE) for p in range(n0)] + [(1, p, Kind.IMAGE) for p in range(n1)]
    # Shuffle inside windows of 200 rows: out of order, as Ray delivers them.
    order = np.concatenate([rng.permutation(np.arange(s, min(s + 200, len(rows)))) for s in range(0, len(rows), 200)])
    # Shard 1 is complete early, shard 0 late: shard 1 is written to its part, not held in memory.
    sink(batch([(1, n1, Kind.MARKER)]))
    peak = 0
    for s in range(0, len(order), 100):
        sink(batch([rows[i] for i in order[s : s + 100]]))
        peak = max(peak, sum(len(u.buffer) for _, u in w.cursors.values()))
        if s == 3000:
            assert w.cursors[0][1].pos > 2000  # shard 0's rows already streamed to its part file
            assert not (tmp_path / "f.hdf5").exists()
    assert peak <= 200  # bounded by how far rows arrive out of order, not by the chunk size
    assert 1 in w.records and not w.finished  # shard 1 is durable; the file waits for shard 0
    out = sink(batch([(0, n0, Kind.MARKER)]))
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
    first(batch([(0, p, Kind.IMAGE) for p in range(5)] + [(0, 5, Kind.MARKER)]))
    first(batch([(2, p, Kind.IMAGE) for p in range(3)] + [(2, 3, Kind.MARKER)]))
    first(batch([(1, 0, Kind.IMAGE)]))  # unit 1 is in flight when the run dies
    del first
    parts = Location.of(str(tmp_path)) / "f.hdf5.parts"
    records = finished_units(parts, SETTINGS)
    assert sorted(records) == [0, 2] and records[0]["rows"] == 5
    assert finished_units(parts, {"x": 2}) == {}  # other settings: start over
    resumed = [(u[0], u[1], u[2], u[3], records.get(k)) for k, u in enumerate(units)]
    second = Sink([spec(tmp_path, resumed)], RUN)
    second(batch([(1, p, Kind.IMAGE) for p in range(2)] + [(1, 2, Kind.MARKER)]))
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        assert list(f["index"].asstr()[()]) == [f"s0/{p}" for p in range(5)] + ["s1/0", "s1/1"] + [
            f"s2/{p}" for p in range(3)
        ]


def test_duplicate_rows_are_dropped(tmp_path):
    sink = Sink([spec(tmp_path, [(0, "a", 3, 0, None)])], RUN)
    sink(batch([(0, 0, Kind.IMAGE), (0, 1, Kind.IMAGE)]))
    sink(batch([(0, 1, Kind.IMAGE), (0, 0, Kind.IMAGE), (0, 2, Kind.IMAGE)]))
    with h5py.File(tmp_path / "f.hdf5", "r") as f:
        assert list(f["index"].asstr()[()]) == ["s0/0", "s0/1", "s0/2"]
        assert f.attrs["duplicates_dropped"] == 2
    assert not os.path.exists(tmp_path / "f.hdf5.parts")


def test_progress_lines(capsys):
    from types import SimpleNamespace

    from ilias_ray.pipeline import Progress

    plan = SimpleNamespace(outputs=[SimpleNamespace(name="features_distractors_00000.hdf5")])
    p = Progress(plan, every=0)
    row = lambda rows, frac, done: {  # noqa: E731
        "out": np.array([0]),
        "rows": np.array([rows]),
        "skipped": np.array([1]),
        "fraction": np.array([frac]),
        "finished": np.array([done]),
        "truncated": np.array([0]),
        "duplicates": np.array([0]),
        "retries": np.array([0]),
    }
    p.update(row(99, 0.25, False))
    p.update(row(399, 1.0, True))
    p.update(row(199, 0.5, False))  # an older row, late (several sink-stage tasks are in flight)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[features_distractors_00000.hdf5] 99 rows, 1 skipped")
    assert "img/s" in lines[0] and "25.0%  ETA " in lines[0]
    assert lines[1].endswith("done")
    assert p.totals() == {
        "rows": 399,
        "skipped": 1,
        "finished": ["features_distractors_00000.hdf5"],
        "truncated_shards": 0,
        "input_duplicates": 0,
        "read_retries": 0,
    }


def test_each_sink_owns_every_nth_output(tmp_path):
    """With N sinks, sink k writes the outputs o with o % N == k (sink.route sends it their rows)
    and no other: another output's row is an error, never a second writer."""
    one = spec(tmp_path, [(0, "a.tar", None, 0, None)])
    outputs = [replace(one, name=f"f{o}.hdf5") for o in range(5)]
    sinks = [Sink(outputs, RUN, k, 2) for k in range(2)]
    assert [sorted(s.writers) for s in sinks] == [[0, 2, 4], [1, 3]]
    rows = batch([(0, 0, Kind.IMAGE), (0, 1, Kind.MARKER)])
    for o in range(5):
        got = sinks[o % 2](dict(rows, out=np.full(2, o)))
        assert got["out"].tolist() == [o] and bool(got["finished"][0])
        with pytest.raises(KeyError):
            sinks[(o + 1) % 2](dict(rows, out=np.full(2, o)))
    assert sorted(p.name for p in tmp_path.glob("*.hdf5")) == [f"f{o}.hdf5" for o in range(5)]
