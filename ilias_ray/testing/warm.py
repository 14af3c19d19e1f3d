"""Worker processes started before a simulated cluster's measured run (tests/e2e/scripts,
bench/cluster.py). Starting one costs about 2.5 CPU-seconds (Ray, then Ray Data and our modules); a
real cluster's nodes start theirs on cores of their own in seconds, a fake cluster's many CPUs share
this machine's two. Ray keeps up to one idle worker per CPU of a node, so the job finds them."""

from __future__ import annotations

import os
import time


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
