"""Run by tests/e2e/test_autoscale.py in its own process: the job on Ray's fake autoscaling cluster
(`ray.cluster_utils.AutoscalingCluster`, the node provider Ray's own autoscaler tests use), starting
from a head with no CPUs and no worker node. Worker types: `gpu` (2 CPUs, 1 GPU) and `cpu` (2 CPUs),
0 to 4 nodes each. Fake GPUs: torch runs on the CPU; ILIAS_RAY_FAULT's sleeps give the model (A) or
decoding (B) the cost of a real one, without loading this machine's cores.

  A  the model is the bound (forward:slow): --model_actors 4 must reach 4 GPU nodes.
  B  decoding is the bound (decode:slow): the autoscaler adds CPU nodes and they decode.

After each run the script waits for the worker nodes to go (idle timeout) and reads the resource
request the autoscaler still holds. It prints one line, REPORT {json}; the test asserts on it and on
the trace files (ILIAS_RAY_TRACE) the workers wrote."""

import json
import os
import sys
import threading
import time

import ray
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.cluster_utils import AutoscalingCluster
from ray.experimental.internal_kv import _internal_kv_get

from ilias_ray.config import Config
from ilias_ray.job.run import run
from ilias_ray.testing.sample import build_flickr_mix

STORE = 200 * 1024 * 1024  # object store per node: small, there are up to 9 on one machine
NODE_TYPES = {
    "gpu": {
        "resources": {"CPU": 2, "GPU": 1, "object_store_memory": STORE},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 4,
    },
    "cpu": {
        "resources": {"CPU": 2, "object_store_memory": STORE},
        "node_config": {},
        "min_workers": 0,
        "max_workers": 4,
    },
}
# An idle worker node goes after 12 s, so that the test sees nodes go soon after a run. Ray Data takes
# a new node into its budget within 20 s (its AutoscalingCoordinator's tick): a node it has not used
# by then may go and be added again, as with any short timeout; a real cluster's is minutes.
IDLE_MINUTES = 0.2
# What the wheel's missing fake_multi_node/example.yaml holds, less the node types.
BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": IDLE_MINUTES,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}


class Cluster(AutoscalingCluster):
    """AutoscalingCluster with its config given as a dict (the wheel lacks example.yaml)."""

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
        return dict(BASE, available_node_types=dict(worker_node_types, **{"ray.head.default": head}), **config_kwargs)


def workers() -> dict:
    """{node id: "gpu" or "cpu"} of the alive worker nodes."""
    return {
        n["NodeID"]: "gpu" if n["Resources"].get("GPU") else "cpu"
        for n in ray.nodes()
        if n["Alive"] and "node:__internal_head__" not in n["Resources"]
    }


def standing_request() -> list:
    """The resource bundles the autoscaler is asked to keep room for (request_resources), now."""
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def scenario(fault: str, shards: str, out: str, trace: str, batch: int) -> dict:
    """One run of the job with ILIAS_RAY_FAULT=fault; what the cluster did during and after it."""
    os.makedirs(trace, exist_ok=True)
    env = {"ILIAS_RAY_TESTING": "1", "ILIAS_RAY_FAULT": fault, "ILIAS_RAY_TRACE": trace}
    os.environ.update(env)  # the driver checks the setting too
    ray.init(address="auto", runtime_env={"env_vars": env}, logging_level="WARNING")
    cfg = Config(
        dataset_dir=shards,
        hdf5_dir=out,
        partition="distractors",
        framework="null",
        model="null_16",
        pretrained=False,
        resolution=64,
        batch_size=batch,
        webdl_batch_size=batch,
        use_gpu=True,
        model_actors=4,
        tar_batch_size=1000,
    )
    summary, kinds, nodes, requested = {}, {}, [], []
    t0 = time.time()
    job = threading.Thread(target=lambda: summary.update(run(cfg)))
    job.start()
    while job.is_alive():
        now = workers()
        kinds.update(now)
        nodes.append((round(time.time() - t0, 1), sum(k == "gpu" for k in now.values()), len(now)))
        requested.append(len(standing_request()))
        time.sleep(0.5)
    job.join()
    ended = time.time()
    # Nothing is left to run: the idle timeout takes every worker node away.
    while workers() and time.time() < ended + 120:
        time.sleep(0.5)
    report = dict(
        rows=summary.get("rows"),
        t0=t0,
        wall_s=round(ended - t0, 1),
        kinds=kinds,  # every worker node seen during the run
        nodes=nodes,  # (s, GPU nodes, worker nodes)
        max_gpu_nodes=max(g for _, g, _ in nodes),
        max_cpu_nodes=max(n - g for _, g, n in nodes),
        requested_max=max(requested),  # bundles Ray Data asked the autoscaler for, at most
        workers_after=len(workers()),
        released_s=round(time.time() - ended, 1),
        request_after=standing_request(),
    )
    ray.shutdown()
    return report


def main(tmp: str) -> None:
    # A: 240 small images in 12 shards, about 115 forward passes of up to 4 images, 1 s each:
    # the model is the bound. B: 800 images, 200 ms to decode each (16 per block), cheap forward
    # passes: decoding is the bound (at 20 ms, this 2-core machine's own cost of moving rows through
    # the cluster's 20-odd processes would be).
    build_flickr_mix(f"{tmp}/a", 240, per_shard=20, long_side=64, seed=0)
    build_flickr_mix(f"{tmp}/b", 800, per_shard=200, long_side=64, seed=1)
    cluster = Cluster(head_resources={"CPU": 0, "object_store_memory": STORE}, worker_node_types=NODE_TYPES)
    cluster.start()
    try:
        report = {
            "A": scenario("forward:slow=1000", f"{tmp}/a", f"{tmp}/out_a", f"{tmp}/trace_a", batch=4),
            "B": scenario("decode:slow=200", f"{tmp}/b", f"{tmp}/out_b", f"{tmp}/trace_b", batch=16),
        }
        with open(f"{tmp}/report.json", "w") as f:
            json.dump(report, f)
        print("REPORT " + json.dumps(report), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
