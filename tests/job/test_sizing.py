"""job/sizing.py: how big each stage is, and the line that says what bounds a GPU pool."""

from __future__ import annotations

from ilias_ray.config import Config
from ilias_ray.job.sizing import cap_notice, model_pool


def test_pool_size_and_read_concurrency():
    from types import SimpleNamespace

    from ilias_ray.config import Config
    from ilias_ray.job.sizing import Pool, model_pool

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
    from ilias_ray.job.sizing import read_concurrency

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
    from ilias_ray.job.sizing import fewest_blocks
    from ilias_ray.plan_types import Source, Unit

    folder = Unit(uid=0, out=0, source=Source.FOLDER, name="positives", items=(("a", "a.jpg", None),) * 300)
    tar = Unit(uid=1, out=1, source=Source.TAR, name="00000.tar", size=1 << 30)
    assert fewest_blocks([folder], 128) == 3 and fewest_blocks([folder, folder], 16) == 38
    assert fewest_blocks([folder, tar], 128) >= 1 << 20


class FakeRay:
    """What model_pool reads of a cluster: its resources now."""

    def __init__(self, **res):
        self.res = res

    def cluster_resources(self):
        return self.res


def cfg(**kw) -> Config:
    return Config(dataset_dir="data", hdf5_dir="out", **kw)


def test_cap_notice_says_what_bounds_the_pool():
    pool = model_pool(cfg(use_gpu=True), FakeRay(CPU=8, GPU=1))
    assert pool.gpu and pool.max_actors == 1  # without --model_actors: the GPUs up now
    assert cap_notice(None, pool.gpu, pool.max_actors) == (
        "model pool: at most 1 GPU actor(s), the GPUs up now; pass --model_actors N to let it grow "
        "onto GPU nodes an autoscaler adds"
    )
    pool = model_pool(cfg(use_gpu=True, model_actors=4), FakeRay(CPU=8, GPU=1))
    assert pool.max_actors == 4 and cap_notice(4, pool.gpu, pool.max_actors) is None
    pool = model_pool(cfg(use_gpu=False), FakeRay(CPU=8))
    assert cap_notice(None, pool.gpu, pool.max_actors) is None  # CPU actors: no GPU nodes to grow onto
