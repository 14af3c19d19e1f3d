"""One writer per output: a second run on an output being written stops at once with one line
that names the first; a run that was killed never blocks the rerun. Local folder and bucket.

The first run is a process of its own (it holds the lock, and is killed); the second and third
run in the test's process, on the session's cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import EXTRACT, kill_opts_run, kill_run_flags, one_line_error_and_stdout, slowed
from ilias_ray.testing.s3 import listing, make_bucket


def start(args, env):
    return subprocess.Popen(
        EXTRACT + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def wait_for(cond, proc, timeout=240):
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def second_run_refused(args, first, capsys) -> str:
    """The second run (in this process) fails before any Ray work on the output, with exit status 2
    and one line that names the first; returns what it printed on stdout."""
    line, said = one_line_error_and_stdout(["extract"] + args, capsys)
    assert "features_distractors_00000.hdf5 is being written by another run (host" in line
    assert f"pid {first.pid}," in line and "ray job stop" in line
    return said


def kill(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_second_run_on_a_local_output_is_refused_and_a_killed_one_does_not_block(
    ray_cluster, sample, tmp_path, uninterrupted, capsys
):
    out = tmp_path / "out"
    args = kill_run_flags(ray_cluster, sample["yfcc"], out)
    first = start(args, slowed(5000))  # still running when the second run comes
    parts = out / (uninterrupted.name + ".parts")
    wait_for(lambda: parts.is_dir(), first)  # it holds the lock and has started writing
    second_run_refused(args, first, capsys)
    assert first.poll() is None  # the first run goes on
    kill(first)  # the OS drops its lock; its lock file may stay behind
    assert kill_opts_run(sample, out)["written"]
    assert (out / uninterrupted.name).exists() and not (out / (uninterrupted.name + ".lock")).exists()


def test_a_second_run_on_a_bucket_output_is_refused_and_a_killed_one_does_not_block(
    ray_cluster, s3_server, sample, tmp_path, capsys, monkeypatch
):
    make_bucket("out-lock")
    from ilias_ray.testing.sample import build_sample  # noqa: F401 - the sample fixture made the shards already

    monkeypatch.setenv("ILIAS_RAY_LEASE_S", "6")  # renewed every 2 s; a dead lease is taken after 6 s
    args = kill_run_flags(ray_cluster, sample["yfcc"], "s3://out-lock/f")
    first = start(args, slowed(5000))  # still running when the second run comes
    wait_for(lambda: "features_distractors_00000.hdf5.lock" in listing("out-lock/f"), first)
    t = time.time()
    said = second_run_refused(args, first, capsys)
    assert "waiting up to 6 s" in said and time.time() - t < 60  # it saw the lease renewed
    kill(first)  # its lease is not renewed any more
    assert kill_opts_run(sample, "s3://out-lock/f")["written"]
    assert listing("out-lock/f") == ["features_distractors_00000.hdf5"]  # the lease is gone with the run
