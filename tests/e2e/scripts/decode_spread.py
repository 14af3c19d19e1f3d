"""Run by tests/e2e/test_elastic.py in its own process: a static cluster of 4 nodes x 8 CPUs x 1 (fake) GPU
(`ray.cluster_utils.Cluster`), decoding emulated at 100 ms per image (ILIAS_RAY_FAULT=decode:slow=100,
set by the test), the model free (the null backbone). Runs the real job over many shards and over
few, and reports from the trace (ILIAS_RAY_TRACE) how many decode tasks ran at once: at the peak, and
on average from the first decode task's start to the last one's end.

The average includes the run's start and its end. What a real cluster pays once, on cores of its
own, is started first (ilias_ray/testing/warm.py): worker processes, one per CPU (32 fake CPUs'
worth took 21-30 s on two cores, longer than the run), room for the processes a node runs beyond
one per CPU (without it Ray stops idle read workers and starts them again for each 200-image
shard), and Ray Data's coordinator (until it answers, each stage runs one task). --bare leaves
out the last two, for comparison. Ray's cost per task is not taken out: each task costs the host's
two cores some tens of milliseconds (driver, raylet, worker); with 16-image blocks 28 tasks at once
took both cores, so the forward passes here are 32 images (--batch_size 32). The model actors start
inside the window (each imports torch: about 4 CPU-seconds).

Usage: decode_spread.py TMP [--bare]"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from ilias_ray.config import Config
from ilias_ray.job.run import run
from ilias_ray.testing.faults import read_trace
from ilias_ray.testing.sample import build_flickr_mix
from ilias_ray.testing.warm import system_config, warm_ray_data, warm_workers

NODES, CPUS = 4, 8
BATCH = 32  # images per forward pass, and per decode task
STORE = 1 << 30  # object store per node: Ray's default for cluster_utils nodes (150 MB) is far below a real node's


def job(tmp: Path, name: str, shards: int, per_shard: int) -> dict:
    data, trace = tmp / f"{name}_yfcc", Path(os.environ["ILIAS_RAY_TRACE"])
    build_flickr_mix(data, shards * per_shard, per_shard, long_side=64)
    for f in trace.glob("*.jsonl"):
        f.unlink()
    opts = dict(framework="null", model="null_16", pretrained=False, resolution=64, batch_size=BATCH)
    summary = run(
        Config(
            dataset_dir=str(data),
            hdf5_dir=str(tmp / name),
            partition="distractors",
            tar_batch_size=1000,
            use_gpu=True,
            model_actors=NODES,
            **opts,
        )
    )
    events = read_trace(trace)
    decodes = [e for e in events if e["event"] == "decode"]
    start, end = min(e["t0"] for e in decodes), max(e["t1"] for e in decodes)
    busy = sum(e["t1"] - e["t0"] for e in decodes)
    steps = [start + 0.5 * i for i in range(int((end - start) / 0.5))]
    timeline = [sum(e["t0"] <= x < e["t1"] for e in decodes) for x in steps]
    return {
        "timeline": timeline,
        "peak": max(timeline),
        "first_forward_s": round(min(e["t"] for e in events if e["event"] == "forward") - start, 2),
        "rows": summary["rows"],
        "decode_tasks": len(decodes),
        "decode_nodes": len({e["node"] for e in decodes}),
        "window_s": round(end - start, 2),
        "concurrency": round(busy / (end - start), 2),
    }


def main(tmp: str, bare: bool = False) -> None:
    tmp = Path(tmp)
    node = {"num_cpus": CPUS, "num_gpus": 1, "object_store_memory": STORE}
    head = node if bare else dict(node, _system_config=system_config(CPUS))
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for _ in range(NODES - 1):
        cluster.add_node(**node)
    ray.init(address=cluster.address)
    t = time.time()
    started = warm_workers(NODES * CPUS)
    print(f"warm-up: {started} worker processes in {time.time() - t:.1f} s", flush=True)
    if not bare:
        print(f"Ray Data's coordinator started in {warm_ray_data():.1f} s", flush=True)
    report = {"many": job(tmp, "many", 32, 200), "few": job(tmp, "few", 4, 800)}
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(tmp / "many_yfcc", ignore_errors=True)
    shutil.rmtree(tmp / "few_yfcc", ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], bare="--bare" in sys.argv[2:])
