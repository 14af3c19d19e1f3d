"""Run by tests/e2e/test_elastic.py in its own process: a multi-node cluster on one machine
(`ray.cluster_utils.Cluster`), a node added mid-run, then a node removed mid-run. Nodes carry fake
GPUs, as when an autoscaler adds GPU nodes: Ray places one model actor per GPU, torch runs on CPU.
Each model batch sleeps (ILIAS_RAY_FAULT=embed:slow=..., set by the test) so that the runs last
while nodes come and go, without loading the machine's CPUs."""

import json
import sys
import threading
import time

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from ilias_ray.config import Config
from ilias_ray.job.run import run


def model_actors() -> int:
    # This cluster's own, by address: another cluster on the machine must not answer.
    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    return sum("Embedder" in (a.class_name or "") for a in alive)


def main(yfcc: str, out: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": True})
    ray.init(address=cluster.address)
    opts = dict(
        dataset_dir=yfcc,
        partition="distractors",
        model="vit_tiny_patch16_224",
        pretrained=False,
        resolution=64,
        batch_size=2,
        webdl_batch_size=2,
        num_workers=2,
        model_actors=3,
        use_gpu=True,
        tar_batch_size=100,
    )  # fake GPUs: torch uses the CPU
    report = {}

    # 1. A node joins mid-run: the model pool grows onto it.
    job = threading.Thread(target=run, args=(Config(hdf5_dir=f"{out}/grow", **opts),))
    job.start()
    deadline = time.time() + 120
    while model_actors() < 1 and time.time() < deadline:
        time.sleep(0.5)
    report["actors_before"] = model_actors()
    node = cluster.add_node(num_cpus=2, num_gpus=1)
    peak = report["actors_before"]
    while job.is_alive():
        peak = max(peak, model_actors())
        time.sleep(0.5)
    job.join()
    report["actors_peak"] = peak

    # 2. A worker node dies mid-run: the job still finishes, every row once.
    job = threading.Thread(target=run, args=(Config(hdf5_dir=f"{out}/lose", **opts),))
    job.start()
    deadline = time.time() + 120
    while model_actors() < 2 and time.time() < deadline and job.is_alive():
        time.sleep(0.5)
    time.sleep(2)
    report["removed_while_running"] = job.is_alive()
    cluster.remove_node(node)
    job.join(timeout=400)
    report["finished"] = not job.is_alive()
    print("REPORT " + json.dumps(report), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
