"""Cluster use: `ray job submit` against a real head node, the launcher config, the job specs,
and where the bytes go (read and decode in one task; only features reach the sink and driver)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml

from conftest import VIT

ROOT = Path(__file__).resolve().parents[2]


BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(config)
    prepared = prepare_config(config)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}  # driver and sink only
    assert types["gpu_worker"]["min_workers"] == 0
    assert types["gpu_worker"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    # The project's own image carries the pinned deps: no node pip-installs anything when it starts.
    assert prepared["docker"]["image"].rsplit("/", 1)[-1].startswith("ilias-ray:")
    setup = prepared["setup_commands"] + prepared["head_setup_commands"] + prepared["worker_setup_commands"]
    assert not any("pip install" in c for c in setup)
    head = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in (ROOT / "cluster.yaml").read_text()
    broken = dict(config, available_node_types={"head": {"node_config": {}, "resources": {}, "bogus": 1}})
    with pytest.raises(Exception):
        validate_config(broken)


def test_rayjob_manifest():
    docs = list(yaml.safe_load_all((ROOT / "jobs" / "rayjob.yaml").read_text()))
    job = next(d for d in docs if d["kind"] == "RayJob")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "jobs/extract_model.py" in spec["entrypoint"]
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert spec["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] == 0


@pytest.fixture
def head_node(tmp_path):
    """A real `ray start --head` with Ray's token authentication on (dashboard on localhost), stopped after
    the test. Its token is a file of its own (RAY_AUTH_TOKEN_PATH, in Ray's format): the user's
    ~/.ray/auth_token is neither read nor written. The env it yields is a client that holds the token."""
    port, dash = free_port(), free_port()
    token = tmp_path / "auth_token"
    token.touch(mode=0o600)
    token.write_text(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)  # it would win over the file
    # Every port explicit: the test session's own cluster already holds Ray's defaults.
    ports = [
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "ray-client-server-port",
            "node-manager-port",
            "object-manager-port",
        )
    ]
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--disable-usage-stats",
            *ports,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while time.time() < deadline:
        p = subprocess.run(
            [str(BIN / "ray"), "job", "list", "--address", address], env=env, capture_output=True, text=True
        )
        if p.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the head node's job server did not come up")
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # `ray start --block` can take half a minute to wind down
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # `ray start` records itself for later `ray.init()` calls; drop the record of this dead head.
    current = Path("/tmp/ray/ray_current_cluster")
    if current.exists() and current.read_text().strip().endswith(f":{port}"):
        current.unlink()


def test_ray_job_submit_runs_a_whole_model_job(head_node, sample, tmp_path):
    address, env = head_node
    # Token auth is on: a client that sends no token, or a wrong one, is refused before anything runs.
    no_token = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH_")}
    for client, refusal in (
        (dict(no_token, RAY_AUTH_MODE="disabled"), "Unauthorized: Missing authentication token"),
        (dict(no_token, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64), "Forbidden: Invalid authentication token"),
    ):
        p = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
            env=client,
            capture_output=True,
            text=True,
            timeout=120,
        )
        said = p.stdout + p.stderr
        assert p.returncode != 0 and refusal in said and "submitted successfully" not in said, said[-3000:]
    out = tmp_path / "features"
    # The job's own env_vars include an ILIAS_RAY_ setting, which the driver forwards to its workers
    # too: Ray refused such a driver ("Failed to merge the Job's runtime env") before it skipped them.
    runtime_env = '{"env_vars": {"ILIAS_RAY_LEASE_S": "90"}}'
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        runtime_env,
        "--",
        "python",
        "jobs/extract_model.py",
        "--model",
        VIT,
        "--resolution",
        "64",
        "--text",
        "false",
        "--core",
        str(sample["core"]),
        "--yfcc",
        str(sample["yfcc"]),
        "--hdf5_dir",
        str(out),
        "--total_tars",
        "3",
        "--pretrained",
        "false",
    ]
    for _ in range(20):  # the job server answers before its agent can take jobs
        submit = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in submit.stderr:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    # Progress and the summary are plain lines in the job's log.
    assert "[features_distractors_00000.hdf5]" in submit.stdout and "summary:" in submit.stdout
    names = sorted(p.name for p in out.glob("*.hdf5"))
    assert names == ["features_distractors_00000.hdf5", "features_image_queries.hdf5", "features_positives.hdf5"]
    with h5py.File(out / "features_distractors_00000.hdf5") as f:
        assert f["features"].shape[0] == len(sample["distractor_keys"]) - len(sample["corrupt_ids"])
