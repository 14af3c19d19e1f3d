"""The job: plan -> read -> decode -> embed -> sink, as one streaming Ray Data dataset.

The driver only plans and prints progress: image bytes are decoded in the task that reads them,
pixels go to the model actors, and only features reach the sink actor.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace

from ilias_ray import faults, models
from ilias_ray.config import ANGLES, SCALES, Config, UserError
from ilias_ray.hdf5_out import OutputSpec, RunInfo, UnitSpec, assemble
from ilias_ray.lock import OutputLocks
from ilias_ray.plan import Plan, check_output_dir, drop_stale, make_plan
from ilias_ray.storage import Location, redact


def say(msg: str) -> None:
    # Plain lines, flushed: they read the same in a terminal and in `ray job logs`.
    print(msg, file=sys.stdout, flush=True)


def fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def job_env_vars() -> dict:
    """The env_vars of the runtime env this driver was submitted with (`ray job submit
    --runtime-env-json`), from what Ray hands a job's entrypoint; {} outside a job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


_STARTED = []  # set when this process connected to Ray (a caller's own connection is left alone)


def quiet_ray_data_console() -> None:
    """Ray Data's own console lines (notices, and the tracebacks of failures that this tool reports
    in one line) are not for our users; they stay in its log file (ray-data.log in the session's
    log directory). ILIAS_RAY_DEBUG=1 keeps them on the console."""
    if os.environ.get("ILIAS_RAY_DEBUG"):
        return
    import ray.data  # noqa: F401 - Ray Data adds its console handler when first imported: quiet it after that

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


def init_ray(cfg: Config):
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        _STARTED.append(True)
        kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
        # ILIAS_RAY_* settings (debugging, test fault injection) and the object store's endpoint and
        # region reach this job's workers on any cluster. Credentials never travel this way: each
        # node takes its own from the standard places. What a submitted job's own runtime env
        # already sets reaches them anyway, and Ray refuses a driver that sets it again.
        given = job_env_vars()
        ours = {
            k: v for k, v in os.environ.items() if (k.startswith("ILIAS_RAY_") or k in FORWARDED_ENV) and k not in given
        }
        if ours:
            kwargs["runtime_env"] = {"env_vars": ours}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a new single-node cluster, not whatever `ray start` last left on this machine.
            ray.init(address="local", include_dashboard=False, **kwargs)
    quiet_ray_data_console()
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own per-file lines are readable in job logs
    ctx.print_on_execution_start = False
    # Waiting for autoscaled GPU nodes must not count as "no progress".
    ctx.execution_no_progress_timeout_s = 6 * 3600
    return ray


def stop_ray() -> None:
    """Disconnect the Ray connection this process made, so that Ray's own shutdown messages come
    before, not after, the one line the command ends with."""
    if _STARTED:
        import ray

        _STARTED.clear()
        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - never hide the error being reported
            pass


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
    thread per process does more work per core than one multi-threaded model (bench/bench.py)."""
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


def output_specs(plan: Plan) -> list:
    """What the sink and the assembly need of each output to write: [OutputSpec], in plan order.
    Each records its own partition's run settings (credentials redacted)."""
    units = {u.uid: u for u in plan.units}
    return [
        OutputSpec(
            name=o.name,
            dir=o.dir,
            settings=o.settings,
            units=tuple(
                UnitSpec(uid, units[uid].name, units[uid].count, units[uid].size, units[uid].record) for uid in o.units
            ),
            run_settings={k: redact(v) if isinstance(v, str) else v for k, v in o.run.items()},
        )
        for o in plan.outputs
    ]


def run_info(cfg: Config) -> RunInfo:
    """What every output of this run shares: vector dtype, compression, pooling."""
    return RunInfo(
        dtype="float16" if cfg.store_fp16 else "float32", compression=cfg.hdf5_compression, local=cfg.pooling == "local"
    )


class Progress:
    """One line per output file every `every` seconds, and one when it finishes. Each count only
    grows: a progress row that arrives after a newer one of the same output changes nothing."""

    def __init__(self, plan: Plan, every: float = 5.0):
        self.names = [o.name for o in plan.outputs]
        self.state = {}
        self.every = every
        self.t0 = time.time()
        self.last = {}
        self.timeline = []  # (seconds since start, rows + skipped so far): bench/ reads steady rates

    def update(self, batch: dict) -> None:
        now = time.time()
        for i, o in enumerate(batch["out"]):
            o = int(o)
            st = dict(
                rows=int(batch["rows"][i]),
                skipped=int(batch["skipped"][i]),
                fraction=float(batch["fraction"][i]),
                finished=bool(batch["finished"][i]),
                truncated=int(batch["truncated"][i]),
                duplicates=int(batch["duplicates"][i]),
                retries=int(batch["retries"][i]),
            )
            # Progress rows reach the driver out of order (several sink-stage tasks are in flight):
            # an output's progress only grows, and once finished it stays finished.
            old = self.state.get(o)
            was_finished = bool(old and old["finished"])
            if old:
                st = {k: max(v, old[k]) for k, v in st.items()}
            self.state[o] = st
            if st["finished"] and not was_finished:
                self.line(o, now, done=True)
            elif not st["finished"] and now - self.last.get(o, self.t0) >= self.every:
                self.line(o, now)
        self.timeline.append((now - self.t0, sum(s["rows"] + s["skipped"] for s in self.state.values())))

    def line(self, o: int, now: float, done: bool = False) -> None:
        st = self.state[o]
        self.last[o] = now
        el = max(now - self.t0, 1e-6)
        n = st["rows"] + st["skipped"]
        rate = n / el
        f = st["fraction"]
        tail = "done" if done else f"{100 * f:5.1f}%  ETA {fmt_eta(el * (1 - f) / f) if f > 0 else '?'}"
        say(f"[{self.names[o]}] {st['rows']} rows, {st['skipped']} skipped  {rate:.1f} img/s  {tail}")

    def totals(self) -> dict:
        return {
            "rows": sum(s["rows"] for s in self.state.values()),
            "skipped": sum(s["skipped"] for s in self.state.values()),
            "finished": [self.names[o] for o, s in sorted(self.state.items()) if s["finished"]],
            "truncated_shards": sum(s["truncated"] for s in self.state.values()),
            "input_duplicates": sum(s["duplicates"] for s in self.state.values()),
            "read_retries": sum(s["retries"] for s in self.state.values()),
        }


def run(cfg: Config) -> dict:
    """Run one extraction; returns the summary dict (also printed)."""
    t0 = time.time()
    cfg.validate()
    notice = faults.check()
    if notice:
        say(notice)
    models.check(cfg.framework, cfg.model, pooling=cfg.pooling, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
    plan = make_plan(cfg)
    for name in plan.done:
        say(f"[{name}] already complete with the same settings: skipped")
    for note in plan.notes:
        say(note)
    summary = {"written": [], "already_done": plan.done, "rows": 0, "skipped": 0}
    if plan.outputs:
        check_output_dir(cfg)
        with OutputLocks(Location.of(cfg.hdf5_dir), [o.name for o in plan.outputs]) as locks:
            drop_stale(cfg, plan)
            units = {u.uid: u for u in plan.units}
            for o in plan.outputs:
                done = sum(units[uid].record is not None for uid in o.units)
                if done:
                    say(f"[{o.name}] resuming: {done} of {len(o.units)} unit(s) already done by an earlier run")
            summary.update(execute(cfg, plan, locks))
    summary["wall_s"] = round(time.time() - t0, 2)
    summary["images_per_s"] = round((summary["rows"] + summary["skipped"]) / max(summary["wall_s"], 1e-6), 2)
    say(
        f"summary: {len(summary['written'])} file(s) written, {len(plan.done)} already complete, "
        f"{summary['rows']} rows, {summary['skipped']} skipped, {summary['wall_s']:.1f} s, "
        f"{summary['images_per_s']:.1f} img/s"
    )
    for name in summary["written"]:
        say(f"  {Location.of(cfg.hdf5_dir) / name}")
    if summary.get("truncated_shards"):
        say(
            f"  {summary['truncated_shards']} shard(s) ended early (truncated, or not a tar): the rows before "
            "the break are kept; each file's 'units' attribute says which"
        )
    if summary.get("read_retries"):
        say(
            f"  {summary['read_retries']} read(s) of shards failed part-way and were retried (dropped connections, "
            "throttling); every row is still written once"
        )
    if summary.get("input_duplicates"):
        say(
            f"  {summary['input_duplicates']} ID(s) occur more than once in the input: every occurrence has its "
            "row; they are listed in the file's 'duplicate_index'"
        )
    return summary


def decoder(cfg: Config):
    """The decode stage's settings (preprocess.Decoder), unpacked from the run's."""
    from ilias_ray.preprocess import Decoder

    return Decoder(
        transforms=cfg.transforms,
        resolution=cfg.resolution,
        min_size=cfg.min_size,
        crop_resize=cfg.crop_resize,
        masking=cfg.masking,
    )


def embedder_args(cfg: Config) -> dict:
    """The model stage's constructor arguments (embed.Embedder), unpacked from the run's settings."""
    from ilias_ray.embed import BackboneSpec

    backbone = BackboneSpec(
        framework=cfg.framework,
        model=cfg.model,
        checkpoint=cfg.checkpoint,
        checkpoint_sha256=cfg.checkpoint_sha256,
        pretrained=cfg.pretrained,
        trust_remote_code=cfg.trust_remote_code,
    )
    return dict(
        backbone=backbone,
        pooling=cfg.pooling,
        scales=SCALES if cfg.multiscale else (1.0,),
        angles=ANGLES if cfg.multirotate else (0,),
        pad=decoder(cfg).pad,
        batch_size=cfg.batch_size,
        comp_fp16=cfg.comp_fp16,
        store_fp16=cfg.store_fp16,
    )


# A read task streams a shard's bytes and parses image headers (read.Grouper): little CPU next to
# decoding, which runs in separate tasks, one per block. Booking a quarter CPU lets a paused read (its
# blocks wait for decoders) hold little of what decoding could use.
READ_CPUS = 0.25
# Read tasks at once: one per DECODES_PER_READ decode slots, at least READS_MIN and one per model
# actor (an autoscaled GPU node then has a reader of its own). A read streams at the storage's
# speed (hundreds of images/s) and decoding takes a CPU-second per 100-200 images, so one reader
# feeds several decoders. Without a cap, Ray Data started one read per shard and reserved a quarter
# of its half-of-the-cluster reservation for them: 32 shards on 4 x 8 CPUs held 32 worker processes
# and 4 CPUs, which held decoding at 24 of 28 CPUs while the reads lasted, and made Ray start 28
# more worker processes for decoding (tests/scripts/decode_spread.py).
DECODES_PER_READ = 8
READS_MIN = 4
HOLD_ROWS_LOCAL = 512  # --pooling local: a row's features are a token grid, so the sink may buffer fewer


def forward_group(cfg: Config) -> int:
    """Rows of one shape that make a block for the model stage: one forward pass (--batch_size), or
    --webdl_batch_size if that is smaller."""
    return max(1, min(cfg.batch_size, cfg.webdl_batch_size))


def grouper(cfg: Config):
    """The read stage's Grouper factory: blocks of whole forward passes of one shape."""
    from functools import partial

    from ilias_ray.read import HOLD_ROWS, Grouper

    window = HOLD_ROWS_LOCAL if cfg.pooling == "local" else HOLD_ROWS
    return partial(Grouper, shape_of=decoder(cfg).group_key, group=forward_group(cfg), window=window)


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


def build_dataset(cfg: Config, plan: Plan, ray):
    """read -> decode -> model actors.

    A read task streams a unit's raw bytes in blocks of whole forward passes of one shape
    (read.Grouper); each block is decoded by a task of its own, on any node with a free CPU
    (preferring the node that read it), so a shard's images spread over as many CPUs as the
    cluster has; each block reaches a model actor whole. Rows leaving it carry features and
    bookkeeping only, never pixels or file bytes. The stages get the few settings each needs
    (decoder, embedder_args), never the whole Config.
    """
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from ilias_ray.blocks import ONE_ROW_BLOCKS, decode_blocks
    from ilias_ray.embed import Embedder
    from ilias_ray.read import IliasDatasource

    pool = model_pool(cfg, ray)
    # The --selected_ids keys go to the object store once; read tasks carry a reference to them.
    keys = None if plan.selected_keys is None else ray.put(plan.selected_keys)
    source = IliasDatasource(plan.units, keys, grouper(cfg))
    pool.min_actors = max(1, min(pool.min_actors, fewest_blocks(source.todo(), forward_group(cfg))))
    reads = read_concurrency(cfg, pool, ray.cluster_resources().get("CPU", 1), source.num_tasks())
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS, override_num_blocks=source.num_tasks(), concurrency=reads)
    ds.context.target_max_block_size = ONE_ROW_BLOCKS  # each block (one packed row) stays whole: blocks.py
    cap = decode_cap(cfg, pool)
    ds = ds.map_batches(
        decode_blocks,
        fn_kwargs={"dec": decoder(cfg)},
        batch_size=None,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=cap) if cap else None,
        num_cpus=pool.decode_cpus,
        scheduling_strategy="DEFAULT",  # locality first: a block is decoded where it was read if a CPU is free
    )
    # One block (whole forward passes of one shape, read.Grouper) per call: batch_size=None. Ray's
    # public map_batches refuses that with GPUs; map_batches_internal (a DeveloperAPI, what Ray's own
    # map_groups calls for GPU actors) is the same stage without that check.
    ds = ds.map_batches_internal(
        Embedder,
        fn_constructor_kwargs=dict(embedder_args(cfg), threads=pool.threads),
        batch_size=None,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        max_restarts=MODEL_ACTOR_RESTARTS,
        max_task_retries=MODEL_BATCH_RETRIES,
        **pool.actor_res,
    )
    return ds, pool


# Sinks: one per SINK_MODEL_ACTORS model actors. One sink takes 20,000-26,000 rows per CPU-second
# of its own through Ray (bench/scale.py, 2-core machine), and a GPU about 1,000 images/s at 512 px.
SINK_MODEL_ACTORS = 16
ROUTES_PER_SINK = 2  # sink-stage tasks in flight per sink: one splits a batch while one waits


def sink_count(cfg: Config, pool: Pool, outputs: int) -> int:
    """--sinks, or one per SINK_MODEL_ACTORS model actors; never more than there are outputs."""
    want = cfg.sinks or -(-pool.max_actors // SINK_MODEL_ACTORS)
    return max(1, min(want, outputs))


def sink_stage(ray, ds, specs: list, run: RunInfo, n: int) -> tuple:
    """`ds` with the sink stage added, and its n sink actors: the actors live on the driver's node
    (which owns --hdf5_dir's staging), each owning the outputs o with o % n == its index, and the
    stage is a task pool (sink.route) that hands each row to its output's sink. Never restarted: a
    new sink would lack the rows the dead one had taken, so its outputs could never finish (the
    run stops, and a rerun resumes). The caller kills the actors when the run ends."""
    from ray.data import TaskPoolStrategy

    from ilias_ray.sink import Sink, route

    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    actor = ray.remote(Sink).options(num_cpus=0, max_restarts=0, resources=here)
    sinks = [actor.remote(specs, run, k, n) for k in range(n)]
    ds = ds.map_batches(
        route,
        fn_kwargs={"sinks": sinks},
        batch_size=None,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=ROUTES_PER_SINK * n),
        num_cpus=0,
    )
    return ds, sinks


def actor_death(e: BaseException):
    """The one-line UserError for a run stopped by a dead actor, or None for other failures."""
    from ray.exceptions import RayActorError

    from ilias_ray.embed import batch_in_flight

    seen, dead = set(), None
    while e is not None and id(e) not in seen and dead is None:
        seen.add(id(e))
        dead = e if isinstance(e, RayActorError) else None
        e = getattr(e, "cause", None) or e.__cause__
    if dead is None:
        return None
    kept = "finished shards are kept: rerun the same command to resume"
    batch = batch_in_flight(dead.actor_id) if getattr(dead, "actor_id", None) else None
    if batch:
        return UserError(
            f"a model batch ({batch}) killed its actor {1 + MODEL_BATCH_RETRIES} times, so the run "
            f"stopped; an image the model cannot take, or an out-of-memory kill, does this; {kept}"
        )
    return UserError(f"an actor died: {str(dead).strip().splitlines()[0][:200]}; {kept}")  # sinks: sink.route


def execute(cfg: Config, plan: Plan, locks: OutputLocks) -> dict:
    from ilias_ray.autoscale import cap_notice
    from ilias_ray.sink import progress_batch, progress_row

    run = run_info(cfg)
    specs = output_specs(plan)
    progress = Progress(plan)
    # Outputs whose shards an earlier run all finished (it stopped while assembling) need no Ray:
    # the commit step runs here.
    for i, spec in enumerate(specs):
        records = {k: u.record for k, u in enumerate(spec.units)}
        if all(r is not None for r in records.values()):
            assemble(spec, run, records)
            progress.update(progress_batch([progress_row(i, records.values())]))
            specs[i] = replace(spec, done=True)
    if not all(spec.done for spec in specs):
        ray = init_ray(cfg)
        ds, pool = build_dataset(cfg, plan, ray)
        ds, sinks = sink_stage(ray, ds, specs, run, sink_count(cfg, pool, len(specs)))
        say(
            f"extracting {len(plan.outputs)} file(s) with {cfg.framework}:{cfg.model} "
            f"({pool.min_actors} to {pool.max_actors} model actor(s), {'GPU' if pool.gpu else 'CPU'}; "
            f"{len(sinks)} sink(s))"
        )
        cap = cap_notice(cfg.model_actors, pool.gpu, pool.max_actors)
        if cap:
            say(cap)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                progress.update(batch)  # the driver sees progress rows only
                locks.check()
        except Exception as e:
            raise actor_death(e) or e
        finally:
            for sink in sinks:  # done, or the run stops: they hold nothing a rerun needs
                ray.kill(sink)
        if os.environ.get("ILIAS_RAY_STATS"):
            say(ds.stats())
    tot = progress.totals()
    missing = [o.name for o in plan.outputs if o.name not in tot["finished"]]
    if missing:
        raise RuntimeError(f"the job ended but these outputs are incomplete: {', '.join(missing)}")
    return {
        "written": tot["finished"],
        "rows": tot["rows"],
        "skipped": tot["skipped"],
        "truncated_shards": tot["truncated_shards"],
        "input_duplicates": tot["input_duplicates"],
        "read_retries": tot["read_retries"],
        "timeline": progress.timeline,
    }
