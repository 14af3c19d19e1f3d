"""How big each stage is: model actors and what each takes, read tasks at once, decode tasks,
sinks; and the one line that says what bounds a GPU pool on an autoscaling cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ilias_ray.config import Config

# Ray Data restarts actors and resends their batches without limit by default. A model actor
# may die now and then (a spot node taken back, an out-of-memory kill): it is restarted, up to
# MODEL_ACTOR_RESTARTS times over the run, and the batch it held is resent. But a batch that kills
# its actor every time (an image the model cannot take) must stop the run, after 1 +
# MODEL_BATCH_RETRIES tries, not loop for hours. The sink is not restarted at all: a new sink
# would not have the rows the dead one had taken, so its shards could never finish.
MODEL_ACTOR_RESTARTS = 20
MODEL_BATCH_RETRIES = 3

CPU_ACTOR_MEMORY = 3 << 30  # bytes a CPU model actor may need (a ViT-L at 512 px, with activations)


@dataclass
class Pool:
    """How the model stage runs: actors, what each asks Ray for, and what a decode task asks."""

    gpu: bool
    max_actors: int
    min_actors: int
    actor_res: dict
    decode_cpus: float
    threads: int  # torch threads per CPU actor (0: torch's default)


def model_pool(cfg: Config, ray) -> Pool:
    """One GPU per actor when the cluster has GPUs, or when --use_gpu true asks for them before any
    GPU node is up (an autoscaler then adds them). The pool starts with what exists now and grows.

    Without GPUs the model shares the cores with decoding: one single-threaded actor per CPU (at
    most one per 3 GiB of memory), each actor and each decode task booked at half a CPU so that the
    OS interleaves them. One torch
    thread per process does more work per core than one multi-threaded model (bench/throughput.py)."""
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if cfg.use_gpu or (cfg.use_gpu is None and gpus):
        n = cfg.model_actors or max(gpus, 1)
        return Pool(True, n, max(1, min(n, gpus)), {"num_gpus": 1}, 1.0, 0)
    cpus = int(res.get("CPU", 1))
    # Each actor holds its own copy of the model: a large one on a many-core box must still fit.
    by_memory = max(1, int(res.get("memory", 0) // CPU_ACTOR_MEMORY)) if res.get("memory") else cpus
    n = cfg.model_actors or min(cpus, by_memory)
    return Pool(False, n, max(1, min(n, cpus)), {"num_cpus": 0.5}, 0.5, 1)


# A read task streams a shard's bytes and parses image headers (stages/grouper.py): little CPU next to
# decoding, which runs in separate tasks, one per block. Booking a quarter CPU lets a paused read (its
# blocks wait for decoders) hold little of what decoding could use.
READ_CPUS = 0.25
# Read tasks at once: one per DECODES_PER_READ decode slots, at least READS_MIN and one per model
# actor (an autoscaled GPU node then has a reader of its own). A read streams at the storage's
# speed (hundreds of images/s) and decoding takes a CPU-second per 100-200 images, so one reader
# feeds several decoders. Without a cap, Ray Data started one read per shard and reserved a quarter
# of its half-of-the-cluster reservation for them: 32 shards on 4 x 8 CPUs held 32 worker processes
# and 4 CPUs, which held decoding at 24 of 28 CPUs while the reads lasted, and made Ray start 28
# more worker processes for decoding (tests/e2e/scripts/decode_spread.py).
DECODES_PER_READ = 8
READS_MIN = 4


def forward_group(cfg: Config) -> int:
    """Rows of one shape that make a block for the model stage: one forward pass (--batch_size), or
    --webdl_batch_size if that is smaller."""
    return max(1, min(cfg.batch_size, cfg.webdl_batch_size))


def decode_cap(cfg: Config, pool: Pool):
    """At most --num_workers decode tasks per model actor (the reference's loader workers per GPU
    process), or None: no cap, every CPU a model actor does not take may decode."""
    return cfg.num_workers * pool.max_actors if cfg.num_workers else None


def read_concurrency(cfg: Config, pool: Pool, cpus: float, units: int) -> int:
    """Read tasks at once: what decoding can take (the cluster's CPUs now, less the model actors',
    or the --num_workers cap), one reader per DECODES_PER_READ of it, at least READS_MIN and one
    per model actor; never more than there are units to read."""
    actor_cpus = pool.max_actors * (1.0 if pool.gpu else pool.actor_res.get("num_cpus", 0))
    slots = max(1.0, cpus - actor_cpus) / pool.decode_cpus
    cap = decode_cap(cfg, pool)
    if cap:
        slots = min(slots, cap)
    want = max(READS_MIN, -(-int(slots) // DECODES_PER_READ), pool.max_actors if pool.gpu else 0)
    return max(1, min(want, units))


def fewest_blocks(units: list, group: int) -> int:
    """The fewest blocks the model stage gets from these units (blocks of at most `group` rows): no
    point starting more model actors than that. A tar's images are counted only once read: it may
    make any number (a YFCC shard holds 100,000), so a run with tars has no such bound."""
    if any(u.count is None for u in units):
        return 1 << 30
    return sum(-(-u.count // group) for u in units)


# Sinks: one per SINK_MODEL_ACTORS model actors. One sink takes 20,000-26,000 rows per CPU-second
# of its own through Ray (bench/scale.py, 2-core machine), and a GPU about 1,000 images/s at 512 px.
SINK_MODEL_ACTORS = 16
ROUTES_PER_SINK = 2  # sink-stage tasks in flight per sink: one splits a batch while one waits


def sink_count(cfg: Config, pool: Pool, outputs: int) -> int:
    """--sinks, or one per SINK_MODEL_ACTORS model actors; never more than there are outputs."""
    want = cfg.sinks or -(-pool.max_actors // SINK_MODEL_ACTORS)
    return max(1, min(want, outputs))


def cap_notice(model_actors: Optional[int], gpu: bool, max_actors: int) -> Optional[str]:
    """The one line a GPU run prints when --model_actors is not given; None otherwise."""
    if not gpu or model_actors:
        return None
    return (
        f"model pool: at most {max_actors} GPU actor(s), the GPUs up now; pass --model_actors N "
        "to let it grow onto GPU nodes an autoscaler adds"
    )
