"""Elastic runs on a multi-node cluster (`ray.cluster_utils.Cluster`, in its own process): the model
pool grows when a node joins, and a node lost mid-run costs a retry, not rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from conftest import slowed
from ilias_ray.testing.sample import build_yfcc_like

SCRIPT = Path(__file__).parent / "scripts" / "elastic.py"


def read(path):
    with h5py.File(path) as f:
        return list(f["index"].asstr()[()]), f["features"][()].astype(np.float32), list(f["skipped_index"].asstr()[()])


def test_pool_grows_with_nodes_and_survives_losing_one(tmp_path):
    # Many small shards: blocks are still waiting for the model stage when the new node joins.
    yfcc = tmp_path / "yfcc"
    build_yfcc_like(yfcc, 60, per_shard=5)
    # 30 model batches of 1 s each: 30 s on one node, while a node is added or removed (the nodes' workers
    # inherit the setting).
    env = slowed(1000, dict(os.environ, RAY_AUTH_MODE="disabled"))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [sys.executable, str(SCRIPT), str(yfcc), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("REPORT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT ") :])
    assert report["actors_before"] == 1 and report["actors_peak"] >= 2  # the pool grew onto the new node
    assert report["removed_while_running"] and report["finished"]

    # Both runs hold every row exactly once, in shard then member order, with the same features.
    want_ids = [f"{s:05d}.tar/{s * 1000000 + j}" for s in range(12) for j in range(5)]  # build_yfcc_like's keys
    grow_ids, grow, grow_skipped = read(tmp_path / "grow" / "features_distractors_00000.hdf5")
    lose_ids, lose, lose_skipped = read(tmp_path / "lose" / "features_distractors_00000.hdf5")
    assert grow_ids == lose_ids == want_ids and grow_skipped == lose_skipped == []
    np.testing.assert_allclose(lose, grow, atol=1e-3)


SPREAD = Path(__file__).parent / "scripts" / "decode_spread.py"


def test_decoding_uses_every_free_cpu_for_many_shards_and_for_few(tmp_path):
    """On a static cluster of 4 nodes x 8 CPUs x 1 GPU, decoding emulated at 100 ms per image, with
    32 shards and with 4: each block is a decode task (not each shard), on every node, and at the peak
    at least 0.7 x 28 of them run at once (32 CPUs less one per model actor): no global cap. The
    goal for the average (0.7 x 28, issue 19 item 3) is measured, not asserted: on two real cores it
    depends on what else the machine runs (docs/benchmarks.md, "Decode tasks at once"); the test
    holds it above half of 28, far above what a global cap of --num_workers (8) gave."""
    trace = tmp_path / "trace"
    trace.mkdir()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="decode:slow=100")
    env.update(ILIAS_RAY_TRACE=str(trace))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run(
        [sys.executable, str(SPREAD), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("REPORT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT ") :])
    for case, rows in (("many", 6400), ("few", 3200)):
        r = report[case]
        assert r["rows"] == rows and r["decode_nodes"] == 4, (case, r)
        assert r["decode_tasks"] >= rows // 32, (case, r)  # one task per 32-image block, not one per shard
        assert r["peak"] >= 0.7 * 28, (case, r)
        assert r["concurrency"] >= 0.5 * 28, (case, r)
