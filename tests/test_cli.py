"""The command line: reference flags, one-line errors, and a crash that leaves nothing finished-looking."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np

from conftest import VIT
from ilias_ray.config import Config
from ilias_ray.pipeline import run

CLI = [sys.executable, "-m", "ilias_ray", "extract"]


def cli(*args, **kw):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300, **kw)


def assert_one_line_error(p):
    assert p.returncode != 0
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr and "error" in lines[0]


def test_user_errors_are_one_line(tmp_path, sample):
    assert_one_line_error(cli("--dataset_dir", str(tmp_path / "nope"), "--hdf5_dir", str(tmp_path)))
    assert_one_line_error(cli("--dataset_dir", str(tmp_path), "--hdf5_dir", str(tmp_path), "--overwrite", "maybe"))
    assert_one_line_error(cli("--dataset_dir", str(sample["yfcc"]), "--hdf5_dir", str(tmp_path),
                              "--partition", "distractors", "--start_tar", "3"))
    assert_one_line_error(cli("--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path),
                              "--model", "vit_nonexistent_model"))
    assert_one_line_error(cli("--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path),
                              "--pooling", "gem", "--masking", "yes"))


def test_reference_readme_command(ray_cluster, sample, tmp_path):
    """The README's query command with `ilias-ray extract`; --pretrained false keeps it offline."""
    address = ray_cluster.get_runtime_context().gcs_address
    p = cli("--partition", "image_queries", "--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path),
            "--framework", "timm", "--model", "vit_large_patch16_siglip_384.webli", "--resolution", "512",
            "--pretrained", "false", "--comp_fp16", "true", "--batch_size", "2", "--address", address)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "[features_image_queries.hdf5]" in p.stdout and "summary: 1 file(s) written" in p.stdout
    with h5py.File(tmp_path / "features_image_queries.hdf5") as f:
        assert f["features"].shape == (sample["n_queries"], 1024) and f["features"].dtype == np.float16


def test_kill_leaves_no_finished_file_and_rerun_redoes_only_unfinished_shards(ray_cluster, sample, tmp_path,
                                                                              capsys):
    opts = dict(partition="distractors", model=VIT, pretrained=False, resolution=160, multiscale=True,
                multirotate=True, batch_size=4, webdl_batch_size=4, num_workers=1)
    run(Config(dataset_dir=str(sample["yfcc"]), hdf5_dir=str(tmp_path / "ref"), **opts))
    out = tmp_path / "killed"
    final = out / "features_distractors_00000.hdf5"
    parts = out / (final.name + ".parts")
    args = [f"--{k}={v}" for k, v in opts.items()]
    address = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(CLI + ["--dataset_dir", str(sample["yfcc"]), "--hdf5_dir", str(out),
                                   "--address", address] + args,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = lambda: sorted(p.name for p in parts.glob("[0-9]*.json")) if parts.exists() else []  # noqa: E731
    deadline = time.time() + 240
    while not done() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # with one shard durable and others in flight
    proc.wait()
    finished = done()
    assert finished and len(finished) < 3 and not final.exists()  # nothing that looks finished
    capsys.readouterr()
    s = run(Config(dataset_dir=str(sample["yfcc"]), hdf5_dir=str(out), **opts))
    said = capsys.readouterr().out
    assert f"resuming: {len(finished)} of 3 unit(s) already done" in said  # only the rest is read again
    assert s["written"] == [final.name] and not parts.exists()
    with h5py.File(final) as a, h5py.File(tmp_path / "ref" / final.name) as b:
        assert list(a["index"].asstr()[()]) == list(b["index"].asstr()[()])
        assert list(a["skipped_index"].asstr()[()]) == list(b["skipped_index"].asstr()[()])
        np.testing.assert_allclose(a["features"][()].astype(np.float32), b["features"][()].astype(np.float32),
                                   atol=1e-3)
