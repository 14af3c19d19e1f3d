"""What a simulated cluster starts before its measured run: the costs that a real cluster pays
once, on cores of its own, in seconds, and that a fake cluster's many CPUs pay on this machine's
two, for longer than the run. tests/e2e/scripts/decode_spread.py uses all three below;
bench/cluster.py the first (its published table predates the other two).

- Worker processes. Starting one costs about 2.5 CPU-seconds (Ray, then Ray Data and our
  modules). `warm_workers` starts one per CPU; Ray keeps them idle for the job.
- How many Ray keeps. A node of the job runs more processes than it has CPUs (a model actor,
  decode tasks at one CPU, read tasks at a quarter of one), and Ray kills the idle ones above its
  soft limit (one per CPU) after a second. A real shard (100,000 images) is read for minutes, so a
  read's process rarely starts again; a test's shards (200 images) are read in a second, and each
  read task then waits for a new process (here, once, 6.7 s with no read running and decoding
  down to none: tests/e2e/scripts/decode_spread.py, 2026-12-06). `system_config` raises the limit.
- Ray Data's coordinator. The first dataset run on a cluster starts Ray Data's autoscaling
  coordinator (a detached actor that every later run shares); until it answers, Ray Data's
  budgets are zero and each stage runs one task. `warm_ray_data` runs a small dataset first, as an
  earlier job on the cluster would have."""

from __future__ import annotations

import os
import time

WORKER_HEADROOM = 4  # processes per node that Ray keeps beyond one per CPU: the model actor's, and reads'


def system_config(cpus_per_node: int) -> dict:
    """The head node's `_system_config` for a simulated cluster whose nodes have this many CPUs."""
    return {"num_workers_soft_limit": cpus_per_node + WORKER_HEADROOM}


def _warm_worker() -> int:
    """Imports what the job's read, decode and sink-stage tasks import, then holds its CPU a moment
    (so that each task starts a worker process of its own)."""
    import ilias_ray.stages.blocks  # noqa: F401
    import ilias_ray.stages.decode  # noqa: F401
    import ilias_ray.stages.read  # noqa: F401
    import ilias_ray.stages.sink  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def warm_workers(cpus: int) -> int:
    """One task per CPU of the connected cluster (`cpus` of them), spread over its nodes; returns
    how many worker processes ran them."""
    import ray

    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_warm_worker)
    return len(set(ray.get([task.remote() for _ in range(cpus)])))


def warm_ray_data() -> float:
    """Run a four-row dataset, which starts Ray Data's autoscaling coordinator; returns seconds."""
    import ray.data

    t = time.time()
    ray.data.range(4).materialize()
    return time.time() - t
