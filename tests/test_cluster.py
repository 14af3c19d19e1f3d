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

ROOT = Path(__file__).resolve().parent.parent
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


def test_job_commands_follow_the_reference_run():
    from ilias_ray.jobs import model_commands, select_rows

    cmds = model_commands("timm", "vit_large_patch16_siglip_384.webli", "/core", "/yfcc", "/out", total_tars=20)
    # The image partitions are one job (one model load); the text tower is a second.
    assert [c[2] for c in cmds] == ["image_queries,positives,distractors", "text_queries"]
    image, text = cmds
    assert image[image.index("--dataset_dir") + 1] == "/core" and image[image.index("--distractors_dir") + 1] == "/yfcc"
    assert image[image.index("--total_tars") + 1] == "20" and "--total_tars" not in text
    assert text[text.index("--framework") + 1] == "text"
    assert [c[2] for c in model_commands("fb", "dinov2_vitl14", "/core", "/yfcc", "/out")] == [
        "image_queries,positives,distractors"
    ]
    assert [c[2] for c in model_commands("fb", "dinov2_vitl14", "/core", None, "/out")] == ["image_queries,positives"]
    rows = select_rows("^DINOv2")
    assert rows and all(r["framework"] == "fb" for r in rows)


def test_decoding_is_its_own_stage_and_blocks_stay_whole(ray_cluster, sample, tmp_path, capsys, monkeypatch):
    """Reading and decoding are separate tasks, so a shard's blocks are decoded by as many tasks as
    the cluster has CPUs for; blocks travel as one packed row each (blocks.py), whole; the model
    stage emits no pixels; the driver sees only the sink's progress rows."""
    from ilias_ray.blocks import PACKED, unpack
    from ilias_ray.config import Config
    from ilias_ray.pipeline import build_dataset, run
    from ilias_ray.plan import make_plan

    cfg = Config(
        dataset_dir=str(sample["yfcc"]),
        hdf5_dir=str(tmp_path),
        partition="distractors",
        model=VIT,
        pretrained=False,
        resolution=64,
    ).validate()
    ds, _ = build_dataset(cfg, make_plan(cfg), ray_cluster)
    batch = ds.take_batch(2, batch_format="numpy")  # two blocks: the sample's shards make a few each
    assert set(batch) == {PACKED} and len(batch[PACKED]) == 2
    assert all(
        set(b) == {"seq", "out", "unit", "pos", "id", "kind", "note", "off", "feat", "nvec"} for b in unpack(batch)
    )
    monkeypatch.setenv("ILIAS_RAY_STATS", "1")
    run(cfg)
    out = capsys.readouterr().out
    assert "ReadIlias" in out and "MapBatches(decode_blocks)" in out and "ReadIlias->" not in out  # not fused
    assert "MapBatches(route)" in out  # the sink stage: tasks that hand rows to the sink actors


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


def test_pool_size_read_concurrency_and_no_progress_timeout(ray_cluster):
    from types import SimpleNamespace

    from ilias_ray.config import Config
    from ilias_ray.pipeline import Pool, init_ray, model_pool

    cfg = Config(dataset_dir=".", hdf5_dir=".")
    cpu_only = SimpleNamespace(cluster_resources=lambda: {"CPU": 16})
    gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 64, "GPU": 8})
    # No GPU: one single-threaded actor per CPU, actors and decode tasks at half a CPU each,
    # but no more actors than 3 GiB of memory each allows.
    assert model_pool(cfg, cpu_only) == Pool(False, 16, 16, {"num_cpus": 0.5}, 0.5, 1)
    small = SimpleNamespace(cluster_resources=lambda: {"CPU": 16, "memory": 16 * 2**30})
    assert model_pool(cfg, small) == Pool(False, 5, 5, {"num_cpus": 0.5}, 0.5, 1)
    assert model_pool(Config(dataset_dir=".", hdf5_dir=".", model_actors=4), cpu_only).max_actors == 4
    assert model_pool(cfg, gpus) == Pool(True, 8, 8, {"num_gpus": 1}, 1.0, 0)
    # An autoscaling cluster with no GPU node up yet: GPU actors on request, up to --model_actors,
    # starting from one and growing as GPU nodes join.
    assert model_pool(Config(dataset_dir=".", hdf5_dir=".", use_gpu=True, model_actors=32), cpu_only) == Pool(
        True, 32, 1, {"num_gpus": 1}, 1.0, 0
    )
    # Read tasks at once: one per 8 decode slots, at least 4 and one per model actor, at most one per unit.
    from ilias_ray.pipeline import read_concurrency

    static = SimpleNamespace(cluster_resources=lambda: {"CPU": 32, "GPU": 4})  # 4 nodes x 8 CPUs x 1 GPU
    assert read_concurrency(cfg, model_pool(cfg, static), 32, units=32) == 4  # 28 decode slots
    assert read_concurrency(cfg, model_pool(cfg, gpus), 64, units=1000) == 8  # 56 slots; 8 actors
    assert read_concurrency(cfg, model_pool(cfg, gpus), 64, units=3) == 3
    autoscaling = Config(dataset_dir=".", hdf5_dir=".", use_gpu=True, model_actors=32)
    assert read_concurrency(autoscaling, model_pool(autoscaling, cpu_only), 16, units=1000) == 32
    assert read_concurrency(cfg, model_pool(cfg, cpu_only), 16, units=1000) == 4  # 16 half-CPU slots
    big = SimpleNamespace(cluster_resources=lambda: {"CPU": 352, "GPU": 32})  # cluster.yaml, grown
    assert read_concurrency(cfg, model_pool(cfg, big), 352, units=1000) == 40  # 320 slots
    capped = Config(dataset_dir=".", hdf5_dir=".", num_workers=2)  # 2 decode tasks per model actor
    assert read_concurrency(capped, model_pool(capped, big), 352, units=1000) == 32  # 64 slots; 32 actors
    # The pool starts no more actors than the fewest blocks the run makes: a folder of 300 images makes
    # at least 3 blocks of 128; a tar shard's images are known only once read (a YFCC shard: 100,000).
    from ilias_ray.pipeline import fewest_blocks
    from ilias_ray.plan import Unit

    folder = Unit(uid=0, out=0, kind="folder", name="positives", items=[("a", "a.jpg", None)] * 300)
    tar = Unit(uid=1, out=1, kind="tar", name="00000.tar", size=1 << 30)
    assert fewest_blocks([folder], 128) == 3 and fewest_blocks([folder, folder], 16) == 38
    assert fewest_blocks([folder, tar], 128) >= 1 << 20
    init_ray(cfg)
    # Waiting minutes for autoscaled GPU nodes must not count as "no progress" (default: 30 min).
    assert ray_cluster.data.DataContext.get_current().execution_no_progress_timeout_s >= 6 * 3600
