"""The command line: reference flags, one-line errors, and a crash that leaves nothing finished-looking."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import CNN_FLAGS, EXTRACT, extract, kill_opts_run, kill_run_flags, slowed


def assert_one_line_error(p):
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "error" in lines[0]


def test_user_errors_are_one_line(tmp_path, sample):
    assert_one_line_error(extract("--dataset_dir", str(tmp_path / "nope"), "--hdf5_dir", str(tmp_path)))
    assert_one_line_error(extract("--dataset_dir", str(tmp_path), "--hdf5_dir", str(tmp_path), "--overwrite", "maybe"))
    assert_one_line_error(
        extract(
            "--dataset_dir",
            str(sample["yfcc"]),
            "--hdf5_dir",
            str(tmp_path),
            "--partition",
            "distractors",
            "--start_tar",
            "3",
        )
    )
    assert_one_line_error(
        extract("--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path), "--model", "vit_nonexistent_model")
    )
    assert_one_line_error(
        extract(
            "--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path), "--pooling", "gem", "--masking", "yes"
        )
    )


def test_reference_readme_command(ray_cluster, sample, tmp_path):
    """The README's query command with `ilias-ray extract`; --pretrained false keeps it offline."""
    address = ray_cluster.get_runtime_context().gcs_address
    p = extract(
        "--partition",
        "image_queries",
        "--dataset_dir",
        str(sample["core"]),
        "--hdf5_dir",
        str(tmp_path),
        "--framework",
        "timm",
        "--model",
        "vit_large_patch16_siglip_384.webli",
        "--resolution",
        "512",
        "--pretrained",
        "false",
        "--comp_fp16",
        "true",
        "--batch_size",
        "2",
        "--address",
        address,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[features_image_queries.hdf5]" in p.stdout and "summary: 1 file(s) written" in p.stdout
    assert "DeprecationWarning" not in p.stderr, p.stderr[-2000:]  # Ray's notices are not our users' to act on
    with h5py.File(tmp_path / "features_image_queries.hdf5") as f:
        assert f["features"].shape == (sample["n_queries"], 1024) and f["features"].dtype == np.float16


def assert_same_file(path, ref):
    with h5py.File(path) as a, h5py.File(ref) as b:
        assert list(a["index"].asstr()[()]) == list(b["index"].asstr()[()])
        assert list(a["skipped_index"].asstr()[()]) == list(b["skipped_index"].asstr()[()])
        np.testing.assert_allclose(
            a["features"][()].astype(np.float32), b["features"][()].astype(np.float32), atol=1e-3
        )


@pytest.mark.parametrize("point", ["starting", "one shard done", "assembling", "SIGINT after one shard"])
def test_interrupted_runs_leave_nothing_finished_looking_and_reruns_resume(
    ray_cluster, sample, tmp_path, capsys, uninterrupted, point
):
    """SIGKILL at several points of a run (and SIGINT): no finished-looking file is left, and the
    rerun's file equals an uninterrupted run's."""
    out = tmp_path / "out"
    final = out / uninterrupted.name
    parts = out / (final.name + ".parts")
    if point == "assembling":
        env = dict(os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="assemble:sleep")  # the sink pauses mid-copy
    else:
        env = slowed(1000)  # about 2.5 s a shard: time to stop after one of the 3
    proc = subprocess.Popen(
        EXTRACT + kill_run_flags(ray_cluster, sample["yfcc"], out),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # Ctrl-C as in a terminal, also when the suite itself runs in the background of a script
        # (`cmd &` starts it with SIGINT ignored, and the child would inherit that and run on).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    done = lambda: sorted(p.name for p in parts.glob("[0-9]*.json")) if parts.exists() else []  # noqa: E731
    reached = {
        "starting": lambda: time.sleep(2) or True,
        "one shard done": lambda: done(),
        "assembling": lambda: (out / (final.name + ".partial")).exists(),
        "SIGINT after one shard": lambda: done(),
    }[point]
    deadline = time.time() + 240
    while not reached() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be stopped"
    if point.startswith("SIGINT"):
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 130
        err = [ln for ln in proc.stderr.read().splitlines() if ln.startswith("ilias-ray")]
        assert err == ["ilias-ray: interrupted: finished files and shards are kept; rerun the same command to resume"]
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = done()
    assert not final.exists()  # nothing that looks finished
    if point != "starting":
        assert finished and (len(finished) < 3 or point == "assembling")
    capsys.readouterr()
    s = kill_opts_run(sample, out)
    said = capsys.readouterr().out
    if finished:
        assert f"resuming: {len(finished)} of 3 unit(s) already done" in said  # only the rest is read again
    assert s["written"] == [final.name] and not parts.exists()
    assert not (out / (final.name + ".partial")).exists()
    assert_same_file(final, uninterrupted)


@pytest.mark.parametrize("action", ["raise", "exit"])
def test_a_fault_in_a_model_actor_costs_a_retry_not_rows(ray_cluster, sample, tmp_path, uninterrupted, action):
    """An exception (retried in the actor) or a crash (Ray restarts the actor and resends the batch),
    injected once: every row is written exactly once, as in an uninterrupted run."""
    once = tmp_path / "fired"
    env = dict(os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT=f"embed:{action}", ILIAS_RAY_FAULT_ONCE=str(once))
    p = extract(*kill_run_flags(ray_cluster, sample["yfcc"], tmp_path / "out"), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "fired.embed").exists()  # the fault did fire
    if action == "raise":
        assert "retrying it once" in p.stdout + p.stderr
    assert_same_file(tmp_path / "out" / uninterrupted.name, uninterrupted)


def test_disk_full_mid_run_is_one_line_and_leaves_nothing_finished(ray_cluster, sample, tmp_path):
    env = dict(os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="sink_write:enospc")
    address = ray_cluster.get_runtime_context().gcs_address
    p = extract(
        "--dataset_dir",
        str(sample["yfcc"]),
        "--hdf5_dir",
        str(tmp_path),
        "--address",
        address,
        "--partition",
        "distractors",
        *CNN_FLAGS,
        env=env,
    )
    # Ray has started, so its own log lines may come first; ours is the last, and no traceback.
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith("ilias-ray: error: --hdf5_dir") and "No space left on device" in last and "rerun" in last
    assert not list(tmp_path.glob("*.hdf5"))


CHEAP = [
    "--partition",
    "distractors",
    *CNN_FLAGS,
    "--batch_size",
    "4",
    "--webdl_batch_size",
    "4",
]


def test_a_batch_that_kills_its_actor_every_time_stops_the_run_and_is_named(ray_cluster, sample, tmp_path):
    """A poison batch (an image that crashes the model, an out-of-memory kill) is tried a bounded
    number of times, then the run stops with one line naming the batch's shard and positions."""
    env = dict(os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="embed:exit")  # every batch, every time
    address = ray_cluster.get_runtime_context().gcs_address
    p = extract(
        "--dataset_dir", str(sample["yfcc"]), "--hdf5_dir", str(tmp_path), "--address", address, *CHEAP, env=env
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    want = (
        r"ilias-ray: error: a model batch \(\d{5}\.tar positions \d+-\d+\) killed its actor 4 times, so the run "
        r"stopped; .* finished shards are kept: rerun the same command to resume"
    )
    assert re.fullmatch(want, last), last


def test_a_sink_that_dies_stops_the_run_at_once(ray_cluster, sample, tmp_path):
    """A restarted sink would lack the rows its predecessor took: it is not restarted, the run stops.
    (Before, the sink died here while building the file, a new one started every shard of it at
    position 0, and the run waited for rows that never came again, to fail only at its end.)"""
    env = dict(
        os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT="assemble:exit", ILIAS_RAY_FAULT_ONCE=str(tmp_path / "fired")
    )
    address = ray_cluster.get_runtime_context().gcs_address
    p = extract(
        "--dataset_dir", str(sample["yfcc"]), "--hdf5_dir", str(tmp_path / "out"), "--address", address, *CHEAP, env=env
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and (tmp_path / "fired.assemble").exists(), p.stderr[-3000:]
    assert last.startswith("ilias-ray: error: the sink (it is not restarted") and "rerun the same command" in last
    assert not list((tmp_path / "out").glob("*.hdf5"))
