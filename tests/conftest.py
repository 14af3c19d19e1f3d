"""Shared fixtures: one local Ray cluster per test session, one sample dataset, one checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

# Ray's token authentication stays off only for the clusters the tests start for themselves
# (`ray.init(address="local")` below, ray.cluster_utils): the laptop case the README documents as the opt-out,
# one throwaway single-user cluster per session. With the mode unset, Ray 2.60 turns tokens on for them and,
# when the user has none, writes a new ~/.ray/auth_token into their home: tests leave the home alone. The
# `ray start` head of test_cluster.py runs with token auth and a token file of its own.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

# Object storage: moto's S3 server on 127.0.0.1 (started by the `s3_server` fixture), set here,
# before any Ray process starts, so that every worker inherits the endpoint and the dummy keys.
from ilias_ray.testing.s3 import free_port, start_moto  # noqa: E402

MOTO_PORT = free_port()
os.environ.update(
    AWS_ENDPOINT_URL=f"http://127.0.0.1:{MOTO_PORT}",
    AWS_ACCESS_KEY_ID="moto-test-key",
    AWS_SECRET_ACCESS_KEY="moto-test-secret-not-real",
    AWS_DEFAULT_REGION="us-east-1",
    AWS_EC2_METADATA_DISABLED="true",
)
# Checkpoints read from a bucket are cached here, not in the user's ~/.cache.
os.environ.setdefault("ILIAS_RAY_CACHE_DIR", tempfile.mkdtemp(prefix="ilias-ray-test-cache-"))

VIT = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster, never one a `ray start` left behind. Workers' and
        # Ray's own log lines are not sent to this process: they arrive late, in whichever test
        # runs then, and would break its one-line-error checks (runs in subprocesses still see them).
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


def one_line_error(args, capsys) -> str:
    """Run the command line in this process (no torch import per case); check that it failed
    before any Ray work with exit status 2 and one line on stderr, and return that line."""
    return one_line_error_and_stdout(args, capsys)[0]


def one_line_error_and_stdout(args, capsys) -> tuple:
    """one_line_error's checks; returns the line and what the command printed on stdout."""
    from ilias_ray.cli import main as cli

    capsys.readouterr()
    try:
        rc = cli.main(args)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in out.err, out.err
    assert "extracting" not in out.out  # it failed before any Ray work
    return lines[0], out.out


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server, one per test session; AWS_ENDPOINT_URL already points at it."""
    proc = start_moto(MOTO_PORT)
    yield MOTO_PORT
    proc.terminate()
    proc.wait(timeout=30)


# The run that tests stop part-way, resume and fault: TTA at 64 px (cheap), small batches, one
# decode task. `slowed` makes it slow to stop at a chosen point, with sleeps, not CPU work.
KILL_OPTS = dict(
    partition="distractors",
    model=VIT,
    pretrained=False,
    resolution=64,
    multiscale=True,
    multirotate=True,
    batch_size=4,
    webdl_batch_size=4,
    num_workers=1,
)
KILL_FLAGS = [f"--{k}={v}" for k, v in KILL_OPTS.items()]  # the same, as command-line flags

EXTRACT = [sys.executable, "-m", "ilias_ray", "extract"]  # `ilias-ray extract`, as a process of its own
CNN_FLAGS = ["--model", "resnet18", "--pretrained", "false", "--resolution", "64"]  # a small model, offline


def extract(*args, **kw) -> subprocess.CompletedProcess:
    """`ilias-ray extract ARGS` in a process of its own, its output captured as text."""
    return subprocess.run(EXTRACT + list(args), capture_output=True, text=True, timeout=300, **kw)


def kill_run_flags(ray_cluster, dataset_dir, out) -> list:
    """The command-line flags of a KILL_OPTS run over `dataset_dir` into `out` (a folder or a URI), on
    the session's cluster."""
    address = ray_cluster.get_runtime_context().gcs_address
    return ["--dataset_dir", str(dataset_dir), "--hdf5_dir", str(out), "--address", address] + KILL_FLAGS


def slowed(ms: int = 1000, env=None) -> dict:
    """An environment whose runs sleep `ms` per model batch (15 batches in a KILL_OPTS run over the
    sample's 3 shards, 2 actors): time to stop them part-way, without slowing the tests' CPUs."""
    return dict(env if env is not None else os.environ, ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT=f"embed:slow={ms}")


def kill_opts_run(sample, out) -> dict:
    """A KILL_OPTS run over the sample's shards into `out` (a folder or a URI), in this process; its
    summary."""
    from ilias_ray.config import Config
    from ilias_ray.job.run import run

    return run(Config(dataset_dir=str(sample["yfcc"]), hdf5_dir=str(out), **KILL_OPTS))


@pytest.fixture(scope="session")
def uninterrupted(ray_cluster, sample, tmp_path_factory):
    """The file of an uninterrupted KILL_OPTS run over the sample's shards: what every interrupted,
    faulted or resumed run must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    kill_opts_run(sample, out)
    return out / "features_distractors_00000.hdf5"


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    from ilias_ray.testing.sample import build_sample

    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def vit_checkpoint(tmp_path_factory):
    from ilias_ray.cli.demo import write_random_checkpoint

    return write_random_checkpoint(VIT, tmp_path_factory.mktemp("ckpt") / "vit.safetensors", seed=1)


def pytest_collection_modifyitems(items):
    """tests/e2e/test_autoscale.py runs first. Ray's AutoscalingCluster starts and stops with `ray stop
    --force`, which ends every Ray cluster on the machine: run later, it would end this session's own
    (`ray_cluster`), and the pytest process with it (a driver whose raylet is gone exits)."""
    first = [i for i in items if i.nodeid.startswith("tests/e2e/test_autoscale.py")]
    items[:] = first + [i for i in items if i not in first]
