"""Cluster bench (issue 19): the job's rate on a simulated cluster of 1, 2, 4 and 8 GPU nodes, on one
machine, against the ideal min(decode capacity, GPU capacity).

    .venv/bin/python bench/cluster.py --json cluster.json    # the full run (about 12 minutes on 2 cores)
    .venv/bin/python bench/cluster.py --quick                # a smoke run (2 nodes, few shards)

What: for each number of GPU nodes (--nodes), each cost setting (--regimes: one where decoding
binds, one where the GPUs do) and a few and many shards (--few, --many), the steady rate of the
real job (`job/run.run`, null backbone `null_16`), the ideal, the efficiency (rate / ideal), which
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
CPU by role: bench/measure.py's Watch (every process under this one, by its title, every second),
each process counted as the role it had (a worker that became an actor is that actor); the task
workers, which run read, decode and route tasks in turn, are split by `Ticks` (a sampling profiler:
which task the title names when the process is on a CPU, 20 times a second). The samplers' own CPU
is taken off the driver's. Real decode and model work is tiny next to the emulated costs, so what
the host's cores spend is the fake cluster's own orchestration: when they are busy, Ray's overhead
binds, not the emulated hardware. Prints the machine and a markdown table; --json writes all of it.

This file runs the bench (the clusters, the jobs, the command line); cluster_probes.py holds the
samplers (RoleWatch, Ticks, Tail and the roles), cluster_analysis.py the steady window, the
capacities, the CPU by role and the table.
"""

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import ray

from cluster_analysis import BATCH, analyse, table
from cluster_probes import RoleWatch, Tail, Ticks
from ilias_ray.testing.warm import warm_workers
from measure import MIB, environ, machine

SIDE = 64  # long side of the JPEGs, and --resolution


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
    from ilias_ray.testing.sample import build_flickr_mix

    path = tmp / f"shards_{rows}_{count}"
    if not path.exists():
        build_flickr_mix(path, rows, -(-rows // count), long_side=SIDE, seed=count)
    return path


def quiet_run(cfg, log: Path) -> dict:
    from ilias_ray.job.run import run

    with open(log, "a") as f, contextlib.redirect_stdout(f):
        return run(cfg)


def set_aside(trace: Path, name: str) -> None:
    """Moves the trace files so far into trace/name/ (read_trace reads trace/*.jsonl only)."""
    (trace / name).mkdir()
    for p in trace.glob("*.jsonl"):
        p.rename(trace / name / p.name)


def measured(cluster, tmp: Path, trace: Path, setting: dict, cpus: int) -> dict:
    """One measured job on the connected cluster; its row of the table."""
    from ilias_ray.testing.faults import read_trace

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


def one_regime(cluster, tmp: Path, nodes: int, regime: tuple, args) -> list:
    """A driver connection with this regime's costs: the warm-up, the idle cluster's CPU, then the
    measured jobs. The warm-up is one task per CPU: the worker processes that the job's tasks will
    use exist from then on (a warm-up job would buy no more: its model actors end with it)."""
    from ilias_ray.job.session import init_ray, stop_ray

    name, decode_ms, forward_ms, shard_counts = regime
    trace = tmp / f"trace_n{nodes}_{name}"
    trace.mkdir()
    fault = f"decode:slow={decode_ms},forward:slow={forward_ms}"
    env = dict(ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT=fault, ILIAS_RAY_TRACE=str(trace))
    counts = {"few": args.few, "many": min(args.many, 4 * nodes * args.cpus)}
    out = []
    with environ(**env), store_budget(nodes * args.store_mib * MIB):
        try:
            init_ray(config(tmp, tmp, nodes, cluster.address))
            warm_workers(nodes * args.cpus)
            idle = idle_cpu(args.idle_s)
            for which in shard_counts:
                setting = dict(
                    nodes=nodes, regime=name, decode_ms=decode_ms, forward_ms=forward_ms, shards=counts[which]
                )
                setting["rows"] = rows_for(setting, args.cpus, args, args.before.get((name, which)))
                res = measured(cluster, tmp, trace, dict(setting, idle=idle), args.cpus)
                args.before[(name, which)] = (res["rate"], res["cpu_s_per_row_all"])
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


def regimes(text: str) -> list:
    """NAME:DECODE_MS:FORWARD_MS[:few|many|both],... -> [(name, decode_ms, forward_ms, ("few", "many"))]."""
    out = []
    for item in text.split(","):
        name, d, f, *which = item.split(":")
        shard_counts = {"few": ("few",), "many": ("many",), "both": ("few", "many")}[(which or ["both"])[0]]
        out.append((name, int(d), int(f), shard_counts))
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
