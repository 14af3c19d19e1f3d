"""The reader on its own: streaming a tar, sample grouping, truncated and non-tar shards."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa

from ilias_ray.plan_types import Source, Unit
from ilias_ray.stages import read
from ilias_ray.stages.blocks import unpack
from ilias_ray.stages.read import read_tar
from ilias_ray.stages.rows import State, UnitEnd
from ilias_ray.storage.location import Location


def rows_of(path, selected=None):
    unit = Unit(uid=3, out=0, source=Source.TAR, name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    return pa.concat_tables(list(read_tar(unit, selected))).to_pylist()


def end(row: dict) -> str:
    return UnitEnd.of(row["unit_end"]).end


def test_tar_samples_in_member_order(sample):
    path = sample["yfcc"] / "00000.tar"
    rows = rows_of(path)
    with tarfile.open(path) as tf:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tf.getmembers()))
    assert [r["id"] for r in rows[:-1]] == [f"00000.tar/{k}" for k in keys]
    assert [r["pos"] for r in rows] == list(range(len(keys) + 1))
    assert all(r["seq"] == (3 << 32) | r["pos"] for r in rows)
    states = {r["id"]: r["state"] for r in rows[:-1]}
    assert all(states[i] == State.SKIPPED for i in sample["nonimage_ids"])
    assert sum(k == State.BYTES for k in states.values()) == len(keys) - len(sample["nonimage_ids"])
    assert all(r["source"] == Source.TAR for r in rows) and all(r["unit_end"] is None for r in rows[:-1])
    assert rows[-1]["state"] == State.END and rows[-1]["pos"] == len(keys)
    assert UnitEnd.of(rows[-1]["unit_end"]) == UnitEnd(count=len(keys), end="eof", repeated_ids=(), retries=0)


def test_truncated_and_not_a_tar(sample, tmp_path):
    data = (sample["yfcc"] / "00001.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    rows = rows_of(cut)
    assert rows[-1]["state"] == State.END and end(rows[-1]).startswith("truncated")
    assert 3 < rows[-1]["pos"] == len(rows) - 1 < 20  # what came before is kept
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    rows = rows_of(junk)
    assert len(rows) == 1 and end(rows[0]).startswith("not a tar") and rows[0]["pos"] == 0


def test_selected_keys_filter(sample):
    keys = sample["distractor_keys"][2:5]
    rows = rows_of(sample["yfcc"] / "00000.tar", frozenset(k.split("/")[1] for k in keys))
    assert [r["id"] for r in rows[:-1]] == keys and rows[-1]["pos"] == 3


def write_tar(path, members):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_only_images_within_the_bound_are_read(tmp_path, monkeypatch):
    """A sample's image is read into memory only up to MAX_MEMBER_BYTES (here 10,000); a larger one
    is a recorded skip, and other members are never read (the tar stream passes over them)."""
    monkeypatch.setattr(read, "MAX_MEMBER_BYTES", 10_000, raising=False)
    read_names = []
    extract = tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda self, m: read_names.append(m.name) or extract(self, m))
    at, over = b"j" * 10_000, b"J" * 10_001
    path = tmp_path / "limits.tar"
    write_tar(
        path,
        [
            ("a.jpg", b"small"),
            ("a.json", b"{}" * 50_000),
            ("b.json", b"{}"),
            ("b.jpg", over),
            ("b.txt", b"t"),
            ("c.jpg", at),
            ("d.txt", b"x" * 20_000),
            ("e.jpg", b"after"),
        ],
    )
    rows = rows_of(path)
    got = [(r["id"], r["state"], r["data"], r["reason"]) for r in rows[:-1]]
    assert got == [
        ("limits.tar/a", State.BYTES, b"small", ""),
        ("limits.tar/b", State.SKIPPED, b"", "image member too large: 10001 bytes, over 10000"),
        ("limits.tar/c", State.BYTES, at, ""),
        ("limits.tar/d", State.SKIPPED, b"", "no jpg member in sample"),
        ("limits.tar/e", State.BYTES, b"after", ""),
    ]
    assert end(rows[-1]) == "eof" and rows[-1]["pos"] == 5
    assert read_names == ["a.jpg", "c.jpg", "e.jpg"]


def test_truncated_inside_a_member_not_read_is_still_truncated(tmp_path):
    """Members passed over unread are still checked to be all there: a shard cut inside one ends
    as `truncated`, keeping the sample being read, as when every member was read."""
    path = tmp_path / "full.tar"
    write_tar(path, [("a.jpg", b"A" * 3000), ("a.json", b"{}" * 50_000), ("b.jpg", b"B" * 3000)])
    with tarfile.open(path) as tf:
        json_member = tf.getmember("a.json")
    for cut_at in (json_member.offset_data + 1000, json_member.offset_data + json_member.size - 1):
        cut = tmp_path / "cut.tar"
        cut.write_bytes(path.read_bytes()[:cut_at])
        rows = rows_of(cut)
        assert [(r["id"], r["state"]) for r in rows[:-1]] == [("cut.tar/a", State.BYTES)]
        assert rows[0]["data"] == b"A" * 3000
        assert end(rows[-1]).startswith("truncated") and rows[-1]["pos"] == 1


def unpacked_rows(tables) -> list:
    """The rows (dicts) of a read task's packed blocks, in the order the task made them."""
    return [dict(zip(b, vals)) for t in tables for b in unpack(t.to_pydict()) for vals in zip(*b.values())]


def test_selected_keys_reach_read_tasks_by_reference(ray_cluster, sample):
    """The --selected_ids keys go to the object store once: a read task's pickled size is about
    2 KB for 3 IDs and for a million (the keys themselves are 8 MB), and it reads only the listed keys."""
    from ray import cloudpickle

    from ilias_ray.plan_types import KeySet

    path = sample["yfcc"] / "00000.tar"
    unit = Unit(uid=3, out=0, source=Source.TAR, name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    listed = [k.split("/")[1] for k in sample["distractor_keys"][2:5]]
    sizes = []
    for extra in (0, 1_000_000):
        ref = ray_cluster.put(KeySet(listed + [f"x{i}" for i in range(extra)]))
        (task,) = read.IliasDatasource([unit], ref).get_read_tasks(1)
        sizes.append(len(cloudpickle.dumps(task)))
        rows = unpacked_rows(task())  # a read task's blocks are packed (blocks.py)
        assert [r["id"] for r in rows[:-1]] == sample["distractor_keys"][2:5]
    assert max(sizes) < 20_000 and abs(sizes[0] - sizes[1]) < 100, sizes
