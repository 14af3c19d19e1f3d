"""The reader on its own: streaming a tar, sample grouping, truncated and non-tar shards."""

from __future__ import annotations

import json
import tarfile

import pyarrow as pa

from ilias_ray.plan import Unit
from ilias_ray.read import MARKER, SKIP, TAR_IMAGE, read_tar
from ilias_ray.storage import Location


def rows_of(path, selected=None):
    unit = Unit(uid=3, out=0, kind="tar", name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    return pa.concat_tables(list(read_tar(unit, selected))).to_pylist()


def end(marker: dict) -> str:
    return json.loads(marker["note"])["end"]


def test_tar_samples_in_member_order(sample):
    path = sample["yfcc"] / "00000.tar"
    rows = rows_of(path)
    with tarfile.open(path) as tf:
        keys = list(dict.fromkeys(m.name.split(".")[0] for m in tf.getmembers()))
    assert [r["id"] for r in rows[:-1]] == [f"00000.tar/{k}" for k in keys]
    assert [r["pos"] for r in rows] == list(range(len(keys) + 1))
    assert all(r["seq"] == (3 << 32) | r["pos"] for r in rows)
    kinds = {r["id"]: r["kind"] for r in rows[:-1]}
    assert all(kinds[i] == SKIP for i in sample["nonimage_ids"])
    assert sum(k == TAR_IMAGE for k in kinds.values()) == len(keys) - len(sample["nonimage_ids"])
    assert rows[-1]["kind"] == MARKER and rows[-1]["pos"] == len(keys)
    assert json.loads(rows[-1]["note"]) == {"end": "eof", "duplicates": [], "retries": 0}


def test_truncated_and_not_a_tar(sample, tmp_path):
    data = (sample["yfcc"] / "00001.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    rows = rows_of(cut)
    assert rows[-1]["kind"] == MARKER and end(rows[-1]).startswith("truncated")
    assert 3 < rows[-1]["pos"] == len(rows) - 1 < 20  # what came before is kept
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    rows = rows_of(junk)
    assert len(rows) == 1 and end(rows[0]).startswith("not a tar") and rows[0]["pos"] == 0


def test_selected_keys_filter(sample):
    keys = sample["distractor_keys"][2:5]
    rows = rows_of(sample["yfcc"] / "00000.tar", frozenset(k.split("/")[1] for k in keys))
    assert [r["id"] for r in rows[:-1]] == keys and rows[-1]["pos"] == 3
