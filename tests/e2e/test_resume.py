"""Resume and reruns do not trust what they cannot see: part files are checked against their
records, a shard's size is part of the settings, other library versions are said, and every
rename is made durable."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest

from conftest import extract, kill_opts_run, kill_run_flags
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.job.run import run


def test_a_part_whose_files_do_not_match_its_record_is_redone(ray_cluster, sample, tmp_path, capsys, uninterrupted):
    """Every shard is finished but the run dies while assembling; one part file is then damaged.
    The rerun redoes that shard, instead of crashing in assembly or copying the damage."""
    out = tmp_path / "out"
    parts = out / (uninterrupted.name + ".parts")
    env = dict(os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="assemble:raise")
    p = extract(*kill_run_flags(ray_cluster, sample["yfcc"], out), env=env)
    assert p.returncode != 0 and sorted(q.name for q in parts.glob("[0-9]*.json")) == ["0.json", "1.json", "2.json"]
    feat = parts / "0.feat"
    feat.write_bytes(feat.read_bytes()[:-10])  # a torn write the record does not describe
    capsys.readouterr()
    kill_opts_run(sample, out)  # the rerun, in this process
    assert "resuming: 2 of 3 unit(s) already done" in capsys.readouterr().out
    with h5py.File(out / uninterrupted.name) as a, h5py.File(uninterrupted) as b:
        assert list(a["index"].asstr()[()]) == list(b["index"].asstr()[()])
        np.testing.assert_allclose(
            a["features"][()].astype(np.float32), b["features"][()].astype(np.float32), atol=1e-3
        )


def test_other_library_versions_are_said_and_a_replaced_shard_is_refused(ray_cluster, sample, tmp_path, capsys):
    shards = tmp_path / "yfcc"
    shards.mkdir()
    for s in sorted(sample["yfcc"].glob("*.tar"))[:2]:
        (shards / s.name).write_bytes(s.read_bytes())
    opts = dict(
        dataset_dir=str(shards),
        hdf5_dir=str(tmp_path / "out"),
        partition="distractors",
        model="resnet18",
        pretrained=False,
        resolution=64,
    )
    run(Config(**opts))
    name = "features_distractors_00000.hdf5"
    with h5py.File(tmp_path / "out" / name, "r+") as f:
        versions = json.loads(f.attrs["versions"])
        f.attrs["versions"] = json.dumps(dict(versions, torch="0.0.1"))
    capsys.readouterr()
    s = run(Config(**opts))
    said = capsys.readouterr().out
    assert s["already_done"] == [name]  # the same settings: kept, but the user is told
    assert f"[{name}] made with torch 0.0.1 (now {versions['torch']})" in said and "--overwrite true" in said
    with open(shards / "00001.tar", "ab") as f:  # another shard under the same name
        f.write(b"\0" * 10240)
    with pytest.raises(UserError, match="shard_sizes"):
        run(Config(**opts))
