"""stages/grouper.py: blocks of whole forward passes, within bounds of positions and bytes."""

from __future__ import annotations

import pytest

from ilias_ray.plan_types import Source, Unit
from ilias_ray.stages.grouper import Grouper
from ilias_ray.stages.read import read_tar
from ilias_ray.stages.rows import State
from ilias_ray.storage.location import Location


def forward_passes(blocks: list, settings: dict, trace, monkeypatch) -> tuple:
    """(passes, minimum): the forward passes the real decode and model stages make of these read
    blocks (counted from the model stage's trace), and the fewest any batching could make: the sum
    over decoded shapes of ceil(images of that shape / --batch_size)."""
    from collections import Counter

    from ilias_ray.stages.decode import decode_batch
    from ilias_ray.testing import faults
    from stage_settings import decoder, embedder

    monkeypatch.setenv("ILIAS_RAY_TESTING", "1")
    monkeypatch.setenv("ILIAS_RAY_TRACE", str(trace))
    trace.mkdir()
    model, dec, shapes = embedder(settings), decoder(settings), Counter()
    for table in blocks:
        block = decode_batch({c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}, dec)
        model(block)
        shapes.update(img.shape[:2] for img, st in zip(block["img"], block["state"]) if st == State.PIXELS)
    passes = sum(1 for e in faults.read_trace(trace) if e["event"] == "forward")
    return passes, sum(-(-n // settings["batch_size"]) for n in shapes.values())


@pytest.mark.parametrize("resolution", [128, 64])
def test_blocks_make_full_forward_passes_on_flickr_shapes(resolution, tmp_path, monkeypatch):
    """Issue 19, item 4: on a 3,000-image shard of Flickr's shape mix, the read stage's blocks
    (stages/grouper.py) give at most 1.3 x the fewest forward passes; blocks of rows in shard order
    (what the stages got before) give over twice as many."""
    from dataclasses import asdict

    from ilias_ray.config import Config
    from ilias_ray.job.stage_args import grouper
    from ilias_ray.testing.sample import build_flickr_mix

    (path,) = build_flickr_mix(tmp_path / "yfcc", 3000, 3000, long_side=160)
    settings = asdict(Config(dataset_dir=".", hdf5_dir=".", framework="null", model="null_16", pretrained=False))
    settings.update(resolution=resolution)
    unit = Unit(uid=0, out=0, source=Source.TAR, name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    grouped = list(read_tar(unit, None, grouper(Config(**settings))))
    in_order = list(read_tar(unit, None, lambda u: Grouper(u, group=128)))
    passes, minimum = forward_passes(grouped, settings, tmp_path / "grouped", monkeypatch)
    plain, _ = forward_passes(in_order, settings, tmp_path / "in_order", monkeypatch)
    print(f"resolution {resolution}: {passes} passes grouped, {plain} in order, minimum {minimum}")
    assert passes <= 1.3 * minimum and plain > 2 * minimum, (passes, plain, minimum)
    assert sum(t.num_rows for t in grouped) == 3001  # every image and the END row, once


def test_grouper_bounds_how_long_and_how_much_it_holds():
    """A row waits at most `window` positions and the task holds at most `hold_bytes`; the unit's
    end lets everything go at once, packed by shape; each position leaves exactly once, and a
    restarted read sends nothing twice."""
    shapes = ["a", "b", "a", "c", "a", "b", "d", "a"] * 25  # 200 rows: "c" and "d" are rare
    unit = Unit(uid=1, out=0, source=Source.TAR, name="x.tar", src=None, size=0)

    def run(g, upto=len(shapes)):
        out, waited = [], 0
        for pos in range(upto):
            for t in g.add(pos, f"k{pos}", State.BYTES, data=b"x" * 10, boxes=shapes[pos]):
                rows = t.to_pylist()
                waited = max(waited, max(pos - r["pos"] for r in rows))
                out.append([r["pos"] for r in rows])
        return out, waited

    g = Grouper(unit, shape_of=lambda data, source, boxes: boxes, group=8, window=20, hold_bytes=10**6)
    blocks, waited = run(g)
    blocks += [[r["pos"] for r in t.to_pylist()] for t in g.finish()]
    assert waited <= 20 and sorted(p for b in blocks for p in b) == list(range(200))
    # "a" (100 rows, one in two positions) fills its groups within the window: 13 passes' worth of blocks
    assert sum(any(shapes[p] == "a" for p in b) for b in blocks) <= 13
    g = Grouper(unit, shape_of=lambda data, source, boxes: boxes, group=8, window=10**6, hold_bytes=100)
    assert max(g.held for _ in run(g)[0][:1] or [0]) <= 100 and g.held <= 100
    g = Grouper(unit, shape_of=lambda data, source, boxes: boxes, group=8)
    first, _ = run(g, upto=120)
    g.restart()  # the shard is read again from its start
    again, _ = run(g)
    again += [[r["pos"] for r in t.to_pylist()] for t in g.finish()]
    assert sorted(p for b in first + again for p in b) == list(range(200))
