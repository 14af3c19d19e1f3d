"""Cluster bench (issue 19): the job's rate on a simulated cluster of 1, 2, 4 and 8 GPU nodes, on one
machine, against the ideal min(decode capacity, GPU capacity).

    .venv/bin/python bench/cluster.py --json cluster.json    # the full run (about 12 minutes on 2 cores)
    .venv/bin/python bench/cluster.py --quick                # a smoke run (2 nodes, few shards)

What: for each number of GPU nodes (--nodes), each cost setting (--regimes: one where decoding
binds, one where the GPUs do) and a few and many shards (--few, --many), the steady rate of the
real job (`pipeline.run`, null backbone `null_16`), the ideal, the efficiency (rate / ideal), which
capacity binds, what the measurements say is at its limit (decode slots, GPUs, this machine's cores),
the decode concurrency, how full the forward passes are, and the orchestration CPU per 1,000 rows by
role: driver, raylets, sink-stage tasks (`route`), sinks (and every other role in the JSON).

How: one `ray.cluster_utils.Cluster` per node count, each node with --cpus CPUs and 1 fake GPU: Ray
schedules one model actor per GPU, torch runs on the CPU. The costs are emulated (test-only
ILIAS_RAY_FAULT=decode:slow=MS,forward:slow=MS: each image decoded sleeps decode_ms, each forward
pass forward_ms), so that many fake CPUs and GPUs can share 2 real cores. A model actor takes 1 CPU:
    decode capacity = nodes x (cpus - 1) x 1000 / decode_ms              images/s
    GPU capacity    = nodes x 1000 / forward_ms x rows per pass          images/s
The shards (`sample.build_flickr_mix`, 64 px JPEGs with Flickr's mix of shapes) make forward passes
of one shape that are not all full, so the rows per pass are counted (in the steady window).
ILIAS_RAY_TRACE records every decode task (start, end, rows, node) and forward pass (rows, node);
the trace files are read as they grow (`Tail`) to time the passes. The steady window opens once
every model actor has made a pass and closes when decoding ends or at 95% of the model's rows
(`steady`); the steady rate is the slower stage's rate in it, or the model stage's if its actors
were busy (the driver's progress counts rows written in order, which lag and jump: it is in the
JSON as sink_rate_10_90). Decode concurrency: the decode tasks' time in the window over its length
(at most nodes x (cpus - 1)); GPU busy: the passes' emulated time over the GPUs' time.

Each cost setting is one driver connection: a warm-up (one task per CPU, importing what the job's
tasks import, so that worker processes exist; a warm-up job would add nothing, as its model actors
end with it), --idle_s of the idle cluster (its CPU by role per second, taken off the job's:
raylets, agents and idle workers cost CPU whatever the job does), then the measured jobs. Ray Data's object store budget
is --store_mib per node (scale.py does the same): with 64 px images its default lets decoding run
thousands of images ahead while the model actors start, which would need runs many times longer.
CPU by role: bench/scale.py's Watch (every process under this one, by its title, every second),
each process counted as the role it had (a worker that became an actor is that actor); the task
workers, which run read, decode and route tasks in turn, are split by `Ticks` (a sampling profiler:
which task the title names when the process is on a CPU, 20 times a second). The samplers' own CPU
is taken off the driver's. Real decode and model work is tiny next to the emulated costs, so what
the host's cores spend is the fake cluster's own orchestration: when they are busy, Ray's overhead
binds, not the emulated hardware. Prints the machine and a markdown table; --json writes all of it.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from scale import Watch, environ, machine  # noqa: E402

MIB = 2**20
BATCH = 16  # images per forward pass (--batch_size and --webdl_batch_size)
SIDE = 64  # long side of the JPEGs, and --resolution
ORCHESTRATION = ("driver", "raylets", "sink-stage tasks", "sinks")
STEADY_END = 0.95  # the steady window ends by this fraction of the rows through the model
OPEN_BY = 0.6  # ... and opens by this fraction, without the model actors that were not up yet


ROLES = (  # first match wins: the raylet's command line names the worker script, a new worker's the raylet
    ("raylet/raylet ", "raylets"),
    ("gcs_server", "gcs"),
    ("default_worker.py", "starting workers"),
    ("setup_worker.py", "starting workers"),
    ("MapBatches(route)", "sink-stage tasks"),
    ("ray::Sink", "sinks"),
    ("Embedder", "model actors"),
    ("decode_blocks", "decode tasks"),
    ("ReadIlias", "read tasks"),
    ("Agent", "node agents"),
    ("dashboard", "dashboard"),
    ("ray::IDLE", "idle workers"),
    ("_StatsActor", "Ray Data actors"),
    ("ActorLocationTracker", "Ray Data actors"),
    ("_AutoscalingCoordinator", "Ray Data actors"),
)
# Roles of the task workers: processes that Ray hands any task (read, decode, route) in turn
TASKS = ("sink-stage tasks", "decode tasks", "read tasks", "idle workers", "starting workers")


def role_of(cmd: str) -> str:
    return next((name for key, name in ROLES if key in cmd), "other")


class RoleWatch(Watch):
    """scale.Watch with this bench's roles (by each process's title, `ROLES`). Each sample keeps
    every process's CPU so far, so that a time window's CPU by role can be read back (`window`).
    A process that was ever an actor, a raylet, ... is that role; the task workers' CPU together is
    split between read, decode and route tasks by `Ticks` (a title at one sample says little:
    a worker runs many short tasks and is idle in between)."""

    ROLES = ROLES

    def __init__(self, every: float = 1.0):
        super().__init__(every)
        self.base = {}  # pid -> CPU seconds when first seen (0 for a process born during the run)
        self.roles = defaultdict(set)
        self.own_cpu = 0.0

    def __enter__(self):
        self.wall0 = time.time()
        return super().__enter__()

    def loop(self):
        super().loop()
        self.own_cpu = time.thread_time()

    def measure(self, p, s: dict) -> None:
        self.base.setdefault(p.pid, self.seen.get(p.pid, 0.0))
        super().measure(p, s)
        self.roles[p.pid].add(self.role(p) or "other")
        s.setdefault("cum", {})[p.pid] = self.seen[p.pid] - self.base[p.pid]

    def role_of_pid(self, pid: int) -> str:
        """An actor's role if the process was ever one (a worker may become an actor), else the
        first of its other roles, else "task workers"."""
        order = [name for _, name in ROLES]
        own = sorted(self.roles[pid] - set(TASKS), key=lambda r: order.index(r) if r in order else -1)
        return own[0] if own else "task workers"  # the driver is not in ROLES: first

    def window(self, t0: float, t1: float, ticks: list) -> tuple:
        """(CPU seconds by role, seconds) between the samples nearest inside wall times t0 and t1;
        the task workers' share split by the ticks in that window."""
        xs = [s for s in self.samples if "cum" in s]
        inside = [s for s in xs if t0 <= self.wall0 + s["t"] <= t1] or xs[-1:]
        last = {}
        for s in inside:
            last.update(s["cum"])
        out = defaultdict(float)
        for pid, cpu in last.items():
            out[self.role_of_pid(pid)] += cpu - inside[0]["cum"].get(pid, 0.0)
        counts = Counter(role for t, role in ticks if t0 <= t <= t1)
        pool = out.pop("task workers", 0.0)
        for role, n in (counts or {"idle workers": 1}).items():
            out[role] += pool * n / sum((counts or {"idle workers": 1}).values())
        return dict(out), max(inside[-1]["t"] - inside[0]["t"], 1e-9)


class Ticks:
    """A sampling profiler of the task workers: every `every` s, each one that is on a CPU (state R
    in /proc/PID/stat) counts a tick for the task its title names. The workers are looked up once a
    second (processes whose title is a task's or idle)."""

    def __init__(self, me, every: float = 0.05):
        self.me, self.every = me, every
        self.ticks, self.pids, self.own_cpu = [], [], 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def loop(self):
        looked = 0.0
        while not self.stop.wait(self.every):
            now = time.time()
            if now - looked >= 1.0:
                self.pids, looked = self.workers(), now
            for pid in self.pids:
                with contextlib.suppress(OSError, IndexError):
                    with open(f"/proc/{pid}/stat", "rb") as f:
                        if f.read().rsplit(b")", 1)[1].split()[0] == b"R":
                            self.ticks.append((now, role_of(title(pid))))
        self.own_cpu = time.thread_time()

    def workers(self) -> list:
        out = []
        for p in self.me.children(recursive=True):
            with contextlib.suppress(OSError):
                if role_of(title(p.pid)) in TASKS:
                    out.append(p.pid)
        return out


def title(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode(errors="replace")


class Tail:
    """Reads the trace files as they grow (every `every` s) and stamps each forward pass with the
    time it was seen: the trace has no times for passes, and the sink's progress (rows written in
    order) lags the model stage by whatever waits for a shard's rarer shapes."""

    def __init__(self, folder: Path, every: float = 0.2):
        self.folder, self.every = folder, every
        self.offsets, self.passes, self.own_cpu = {}, [], 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def loop(self):
        while not self.stop.wait(self.every):
            self.poll()
        self.poll()
        self.own_cpu = time.thread_time()

    def poll(self) -> None:
        now = time.time()
        for p in self.folder.glob("*.jsonl"):
            off = self.offsets.get(p.name, 0)
            if p.stat().st_size <= off:
                continue
            with open(p, "rb") as f:
                f.seek(off)
                data = f.read()
            done = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
            self.offsets[p.name] = off + done
            for line in data[:done].splitlines():
                e = json.loads(line)
                if e["event"] == "forward":
                    self.passes.append((now, e["node"], e["rows"]))


def start_cluster(nodes: int, cpus: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "num_gpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, num_gpus=1)
    cluster.wait_for_nodes()
    return cluster


def config(shards: Path, out: Path, nodes: int, address: str):
    from ilias_ray.config import Config

    return Config(
        dataset_dir=str(shards),
        hdf5_dir=str(out),
        partition="distractors",
        framework="null",
        model="null_16",
        pretrained=False,
        resolution=SIDE,
        batch_size=BATCH,
        webdl_batch_size=BATCH,
        use_gpu=True,
        model_actors=nodes,
        tar_batch_size=1000,
        address=address,
    )


def shards(tmp: Path, rows: int, count: int) -> Path:
    from ilias_ray.sample import build_flickr_mix

    path = tmp / f"shards_{rows}_{count}"
    if not path.exists():
        build_flickr_mix(path, rows, -(-rows // count), long_side=SIDE, seed=count)
    return path


def quiet_run(cfg, log: Path) -> dict:
    from ilias_ray.pipeline import run

    with open(log, "a") as f, contextlib.redirect_stdout(f):
        return run(cfg)


def set_aside(trace: Path, name: str) -> None:
    """Moves the trace files so far into trace/name/ (read_trace reads trace/*.jsonl only)."""
    (trace / name).mkdir()
    for p in trace.glob("*.jsonl"):
        p.rename(trace / name / p.name)


def sink_rate(timeline: list, lo: float = 0.1, hi: float = 0.9) -> float:
    """Rows/s written between `lo` and `hi` of the rows (the driver's progress timeline)."""
    ts = np.array([0.0] + [t for t, _ in timeline])
    ns = np.array([0.0] + [n for _, n in timeline], dtype=float)
    t_lo, t_hi = np.interp([lo * ns[-1], hi * ns[-1]], ns, ts)
    return (hi - lo) * ns[-1] / max(t_hi - t_lo, 1e-9)


def decoded(events: list, t0: float, t1: float) -> tuple:
    """(rows decoded, decode task-seconds) in [t0, t1], each task counted for its part inside."""
    rows = busy = 0.0
    for e in events:
        inside = max(0.0, min(e["t1"], t1) - max(e["t0"], t0))
        busy += inside
        rows += e["rows"] * inside / max(e["t1"] - e["t0"], 1e-9)
    return rows, busy


def steady(passes: list, decodes: list, forward_s: float) -> dict:
    """The window where both stages run, and each stage's rate in it. It opens when the model
    actors have each made a first pass (their start-up and the first backlog stay out), leaving
    out an actor that came so late that less than OPEN_BY of the model's rows were left (it counts
    as missing), and closes when decoding ends, or at STEADY_END of the model's rows if that is
    earlier (the last passes are shards' leftovers). The steady rate is the slower stage's in it:
    the model stage's alone would count its catch-up on the backlog decoded while the actors
    started, decoding's alone a backlog still filling. But if the model actors that are up were
    busy (forward_s per pass) through the window, or decoding ended early in it (most was decoded
    while the actors started), the model stage's rate: it is the bound."""
    first = {}
    for t, node, _ in passes:
        first.setdefault(node, t)
    times = np.array([t for t, _, _ in passes])
    rows = np.cumsum([r for _, _, r in passes])
    w_end = float(times[np.searchsorted(rows, STEADY_END * rows[-1])])
    late = float(times[np.searchsorted(rows, OPEN_BY * rows[-1])])
    w0 = max(t for t in first.values() if t <= late)
    w1 = min(w_end, max(e["t1"] for e in decodes))
    both = w1 - w0 >= max(3.0, 0.5 * (w_end - w0))  # decoding ran through most of the window
    w1 = w1 if both else w_end
    inside = [(t, r) for t, _, r in passes if w0 < t <= w1]
    span = max(w1 - w0, 1e-9)
    model = sum(r for _, r in inside) / span
    dec_rows, dec_busy = decoded(decodes, w0, w1)
    up = sum(t <= w0 for t in first.values())
    saturated = len(inside) * forward_s / (up * span) >= 0.85  # the model actors that are up are busy
    out = dict(w0=w0, w1=w1, span=span, model=model, decode=dec_rows / span, busy=dec_busy, passes=inside)
    out.update(rate=min(model, dec_rows / span) if both and not saturated else model, firsts=sorted(first.values()))
    out["gpus_up"] = up
    return out


def per_node(events: list) -> dict:
    out = defaultdict(int)
    for node in events:
        out[node] += 1
    return dict(out)


def balance(counts: dict, nodes: int) -> float:
    """Least / most work of one node (0 when a node did none)."""
    xs = list(counts.values()) + [0] * (nodes - len(counts))
    return round(min(xs) / max(max(xs), 1), 2)


def capacities(nodes: int, cpus: int, decode_ms: int, forward_ms: int, per_pass: float) -> dict:
    decode = nodes * (cpus - 1) * 1000 / decode_ms
    gpu = nodes * 1000 / forward_ms * per_pass
    return {
        "decode_cap": round(decode, 1),
        "gpu_cap": round(gpu, 1),
        "gpu_cap_full_passes": round(nodes * 1000 / forward_ms * BATCH, 1),
        "ideal": round(min(decode, gpu), 1),
        "binds": "decode" if decode < gpu else "gpu",
    }


def saturated(res: dict) -> str:
    """What the measurements say is at its limit: decode slots, GPUs, the host's cores."""
    out = []
    if res["decode_concurrency"] >= 0.9 * res["decode_slots"]:
        out.append("decode")
    if res["gpu_busy"] >= 0.9:
        out.append("gpu")
    if res["host_cpu_busy"] >= 0.85:
        out.append("host CPU")
    return " + ".join(out) or "none"


def cpu_part(watch: RoleWatch, tail: Tail, ticks: Ticks, w: dict, res: dict) -> dict:
    """Host CPU busy and CPU-seconds per 1,000 rows by role in the window, less what the idle
    cluster costs in that time (res["idle"]) and less the samplers' own CPU (off the driver's)."""
    cpu, span = watch.window(w["w0"], w["w1"], ticks.ticks)
    total = max(watch.samples[-1]["t"], 1e-9)
    own = (watch.own_cpu + tail.own_cpu + ticks.own_cpu) * span / total
    cpu["driver"] = max(0.0, cpu.get("driver", 0.0) - own)
    rows = res["rate"] * span
    idle = res.pop("idle")
    work = {k: max(0.0, v - idle.get(k, 0.0) * span) for k, v in cpu.items()}
    return {
        "host_cpu_busy": round(sum(cpu.values()) / (span * os.cpu_count()), 2),
        "cpu_s_per_1000_rows": {k: round(1000 * v / rows, 3) for k, v in sorted(work.items())},
        "cpu_s_per_1000_rows_with_idle": {k: round(1000 * v / rows, 3) for k, v in sorted(cpu.items())},
        "idle_cluster_cpu_per_s": {k: round(v, 3) for k, v in sorted(idle.items())},
        "sampler_cpu_s_per_1000_rows": round(1000 * own / rows, 3),
        "cpu_s_per_row_all": sum(cpu.values()) / rows,
    }


def analyse(summary: dict, probes: tuple, events: list, setting: dict, cpus: int) -> dict:
    watch, tail, ticks = probes
    nodes = setting["nodes"]
    decodes = [e for e in events if e["event"] == "decode"]
    passes = [e for e in events if e["event"] == "forward"]
    w = steady(tail.passes, decodes, setting["forward_ms"] / 1000)
    per_pass = sum(r for _, r in w["passes"]) / max(len(w["passes"]), 1)
    res = dict(setting, rows=summary["rows"] + summary["skipped"], wall_s=round(summary["wall_s"], 1))
    res.update(w0=w["w0"], firsts=w["firsts"])
    res.update(capacities(nodes, cpus, setting["decode_ms"], setting["forward_ms"], per_pass))
    res.update(rate=round(w["rate"], 1), efficiency=round(w["rate"] / res["ideal"], 2), window_s=round(w["span"], 1))
    res.update(model_stage_rate=round(w["model"], 1), decode_stage_rate=round(w["decode"], 1))
    res["sink_rate_10_90"] = round(sink_rate(summary["timeline"]), 1)
    res.update(rows_per_pass=round(per_pass, 2), passes=len(passes), decode_slots=nodes * (cpus - 1))
    res["rows_per_pass_whole_run"] = round(sum(e["rows"] for e in passes) / max(len(passes), 1), 2)
    res["decode_concurrency"] = round(w["busy"] / w["span"], 2)
    res["gpu_busy"] = round(len(w["passes"]) * setting["forward_ms"] / 1000 / (nodes * w["span"]), 2)
    res["gpus_up"] = w["gpus_up"]
    res["node_balance_passes"] = balance(per_node(e["node"] for e in passes), nodes)
    res["node_balance_decode_tasks"] = balance(per_node(e["node"] for e in decodes), nodes)
    res.update(cpu_part(watch, tail, ticks, w, res))
    res["saturated"] = saturated(res)
    return res


def measured(cluster, tmp: Path, trace: Path, setting: dict, cpus: int) -> dict:
    """One measured job on the connected cluster; its row of the table."""
    from ilias_ray.faults import read_trace

    name = f"n{setting['nodes']}_{setting['regime']}_{setting['shards']}"
    data = shards(tmp, setting["rows"], setting["shards"])
    set_aside(trace, f"before_{name}")
    cfg = config(data, tmp / f"out_{name}", setting["nodes"], cluster.address)
    with RoleWatch() as watch, Tail(trace) as tail, Ticks(watch.me) as ticks:
        start = time.time()
        summary = quiet_run(cfg, tmp / "jobs.log")
    res = analyse(summary, (watch, tail, ticks), read_trace(trace), setting, cpus)
    res["window_from_s"] = round(res.pop("w0") - start, 1)
    res["first_pass_s"] = [round(t - start, 1) for t in res.pop("firsts")]
    res["actors_ready_s"] = res["first_pass_s"][-1]
    res["cpu_s_per_row_all"] = round(res["cpu_s_per_row_all"], 5)
    print(f"[{name}: {res['rate']} img/s of {res['ideal']} ideal, {res['wall_s']} s]", file=sys.stderr, flush=True)
    return res


def rows_for(setting: dict, cpus: int, args, before) -> int:
    """Rows for a steady window of about --seconds once the model actors are up, at the expected
    rate, plus what Ray Data may decode ahead while they start (the store budget's worth): the
    expected rate is the ideal (passes taken as half full), or less if the same regime and shard
    count with half the nodes (`before`: its rate and CPU-seconds per row) says so: at most twice
    its rate, at most what this machine's cores give at its CPU per row. Rounded to 100."""
    nodes, decode_ms, forward_ms = setting["nodes"], setting["decode_ms"], setting["forward_ms"]
    rate = min(nodes * (cpus - 1) * 1000 / decode_ms, nodes * 1000 / forward_ms * BATCH / 2)
    if before:
        rate = min(rate, 2 * before[0], 1.2 * os.cpu_count() / max(before[1], 1e-9))
    ahead = nodes * args.store_mib * MIB / (SIDE * SIDE * 3 * 0.75)  # decoded images of about 64x48
    return max(100 * nodes, 100 * math.ceil((rate * args.seconds + ahead) / 100))


@contextlib.contextmanager
def store_budget(nbytes: int):
    """Ray Data's object store budget for this process's datasets: `nbytes`, then as it was."""
    limits = ray.data.DataContext.get_current().execution_options
    default = limits.resource_limits
    limits.resource_limits = default.copy(object_store_memory=nbytes)
    try:
        yield
    finally:
        limits.resource_limits = default


def idle_cpu(seconds: float) -> dict:
    """CPU-seconds per second by role of the connected, idle cluster (raylets, agents, workers
    waiting), over `seconds`: what the fake cluster costs whatever it does."""
    with RoleWatch(every=0.5) as watch, Ticks(watch.me) as ticks:
        time.sleep(seconds)
    cpu, span = watch.window(0, float("inf"), ticks.ticks)
    cpu["driver"] = max(0.0, cpu.get("driver", 0.0) - watch.own_cpu - ticks.own_cpu)
    return {k: v / span for k, v in cpu.items()}


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def warm_worker() -> int:
    """Imports what the job's read, decode and route tasks import, then holds its CPU a moment (so
    that each of these tasks gets a worker process of its own)."""
    import ilias_ray.blocks  # noqa: F401
    import ilias_ray.preprocess  # noqa: F401
    import ilias_ray.read  # noqa: F401
    import ilias_ray.sink  # noqa: F401

    time.sleep(1.0)
    return os.getpid()


def one_regime(cluster, tmp: Path, nodes: int, regime: tuple, args) -> list:
    """A driver connection with this regime's costs: the warm-up, the idle cluster's CPU, then the
    measured jobs. The warm-up is one task per CPU: the worker processes that the job's tasks will
    use exist from then on (a warm-up job would buy no more: its model actors end with it)."""
    from ilias_ray.pipeline import init_ray, stop_ray

    name, decode_ms, forward_ms, kinds = regime
    trace = tmp / f"trace_n{nodes}_{name}"
    trace.mkdir()
    fault = f"decode:slow={decode_ms},forward:slow={forward_ms}"
    env = dict(ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT=fault, ILIAS_RAY_TRACE=str(trace))
    counts = {"few": args.few, "many": min(args.many, 4 * nodes * args.cpus)}
    out = []
    with environ(**env), store_budget(nodes * args.store_mib * MIB):
        try:
            init_ray(config(tmp, tmp, nodes, cluster.address))
            ray.get([warm_worker.remote() for _ in range(nodes * args.cpus)])
            idle = idle_cpu(args.idle_s)
            for kind in kinds:
                setting = dict(
                    nodes=nodes, regime=name, decode_ms=decode_ms, forward_ms=forward_ms, shards=counts[kind]
                )
                setting["rows"] = rows_for(setting, args.cpus, args, args.before.get((name, kind)))
                res = measured(cluster, tmp, trace, dict(setting, idle=idle), args.cpus)
                args.before[(name, kind)] = (res["rate"], res["cpu_s_per_row_all"])
                out.append(res)
        finally:
            stop_ray()
    return out


def one_size(tmp: Path, nodes: int, args) -> list:
    t = time.perf_counter()
    cluster = start_cluster(nodes, args.cpus)
    print(f"[{nodes} node(s) up in {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    try:
        return [r for regime in args.regimes for r in one_regime(cluster, tmp, nodes, regime, args)]
    finally:
        cluster.shutdown()


def table(results: list) -> str:
    head = (
        "| costs, ms (decode / forward) | GPU nodes | shards | rows | steady img/s | decode cap | GPU cap (rows/pass) "
        "| ideal | efficiency | binds | decode concurrency | GPUs up (busy) | host CPU busy | saturated "
        "| driver | raylets | sink-stage tasks | sinks | all roles |"
    )
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in results:
        cpu = r["cpu_s_per_1000_rows"]
        roles = " | ".join(f"{cpu.get(k, 0.0):.2f}" for k in ORCHESTRATION) + f" | {sum(cpu.values()):.2f}"
        lines.append(
            f"| {r['regime']} ({r['decode_ms']} / {r['forward_ms']}) | {r['nodes']} | {r['shards']} | {r['rows']:,} "
            f"| {r['rate']:,.1f} | {r['decode_cap']:,.0f} | {r['gpu_cap']:,.0f} ({r['rows_per_pass']:.1f}) "
            f"| {r['ideal']:,.0f} | {r['efficiency']:.2f} | {r['binds']} "
            f"| {r['decode_concurrency']:.1f} of {r['decode_slots']} "
            f"| {r['gpus_up']} of {r['nodes']} ({r['gpu_busy']:.2f}) "
            f"| {r['host_cpu_busy']:.2f} | {r['saturated']} | {roles} |"
        )
    return "\n".join(lines)


def regimes(text: str) -> list:
    """NAME:DECODE_MS:FORWARD_MS[:few|many|both],... -> [(name, decode_ms, forward_ms, ("few", "many"))]."""
    out = []
    for item in text.split(","):
        name, d, f, *which = item.split(":")
        kinds = {"few": ("few",), "many": ("many",), "both": ("few", "many")}[(which or ["both"])[0]]
        out.append((name, int(d), int(f), kinds))
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2,4,8", help="GPU node counts, comma-separated")
    ap.add_argument("--cpus", type=int, default=4, help="CPUs per simulated node (one goes to its model actor)")
    ap.add_argument("--few", type=int, default=4, help="shards of the 'few shards' runs")
    ap.add_argument(
        "--regimes",
        type=regimes,
        default=regimes("decode:120:60:both,gpu:30:200:few"),
        help="cost settings NAME:DECODE_MS:FORWARD_MS:SHARDS (ms per image decoded, ms per forward pass; "
        "few, many or both shard counts)",
    )
    ap.add_argument("--many", type=int, default=64, help="shards of the 'many shards' runs, at most 4 x nodes x CPUs")
    ap.add_argument("--seconds", type=float, default=10, help="steady window wanted per measured run, seconds")
    ap.add_argument("--store_mib", type=int, default=2, help="Ray Data's object store budget per node, MiB")
    ap.add_argument("--idle_s", type=float, default=3, help="seconds the idle cluster's CPU is measured")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 nodes, few shards, short runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.nodes = [int(n) for n in args.nodes.split(",")]
    args.before = {}  # (regime, "few" or "many") -> (rate, CPU-s per row) of the last node count
    if args.quick:
        args.nodes, args.seconds = [2], 8
        args.regimes = [(name, d, f, ("few",)) for name, d, f, _ in args.regimes]
    return args


def main() -> int:
    args = parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway local clusters, as in the tests
    tmp = Path(tempfile.mkdtemp(prefix="ilias-bench-cluster-"))
    t = time.perf_counter()
    try:
        results = [r for n in args.nodes for r in one_size(tmp, n, args)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = dict(machine(), cpus_per_node=args.cpus, bench_s=round(time.perf_counter() - t))
    print(f"{info['machine']}; {args.cpus} CPUs and 1 GPU per simulated node; bench {info['bench_s']} s")
    print(table(results))
    print("states seen:", dict(Counter(r["saturated"] for r in results)))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
