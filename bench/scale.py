"""Scale bench (issue 13): the benchmark's shape without a GPU or 100M images, in one run.

    .venv/bin/python bench/scale.py                     # all four sections, default sizes
    .venv/bin/python bench/scale.py --only sink --shards 200 --per_shard 50

It builds --shards tar shards of --per_shard copies of one 32x32 JPEG in a temporary folder, and
runs the real job (`job/run.run`) over them with the null backbone (ilias_ray/testing/null_backbone.py,
`null_1024`: D=1024, fp16, 2 KiB per row, at no cost), so that what is measured is Ray, the sink
and the driver. The null backbone exists only under ILIAS_RAY_TESTING=1, which this bench sets
(init_ray forwards ILIAS_RAY_* to the workers). A thread samples every 0.5 s: the object store's
bytes used and spilled (the raylet's store stats), the RSS of the driver and of the sink actor,
the sink's open file descriptors, and each Ray process's CPU time, by role.

planning      bench/selected_ids.py --plan_only in its own process: seconds and the driver's peak
              RSS to plan 1,000 shards with a --ids long --selected_ids list.
sink          rows/s reaching the sink in the real job (steady: between 10% and 90% of the rows,
              from the driver's progress timeline) and the CPU seconds of each role; the sink's
              busy fraction (its CPU seconds / the run's seconds) says whether it is the bound.
              Then the sink stage alone (job/dataset.sink_stage, as the job builds it),
              fed pre-made D=1024 fp16 rows of 4 outputs by Ray, with 1, 2 and 4 sinks: rows/s and
              rows per CPU-second of the sinks, as they are (--fed_rows) and with each sink slowed
              to --scaling_slow_ms per row (--scaling_rows): a sink that is the bound whatever the
              cores, so the stage's rate shows how it grows with the sinks.
backpressure  the job with the sink slowed by --slow_ms per row written (ILIAS_RAY_FAULT=
              sink_write:slow=MS) over --bp_shards shards, with Ray Data's object store budget
              set to --bp_store_mib (these tiny shards are far below its default budget, a share
              of the store, so only a small one shows whether it binds): peaks of the object
              store, spilled bytes, driver and sink RSS, in the first and the second half of the
              run (flat: the second half's peak is not above the first's by more than 25% plus
              64 MiB).
outputs       the job with --tar_batch_size 1: one output file per shard, thousands of outputs; the
              sink's peak open files and RSS, first half against second half.
Prints the machine and a table; --json writes it.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray

from ilias_ray.plan_types import Plan
from measure import MIB, Watch, environ, machine, report, steady_rate
from selected_ids import make_shards
from sink_capacity import batches, one_output

HERE = Path(__file__).resolve().parent
MODEL = "null_1024"
SIDE = 32  # pixels of the tiny JPEGs (and --resolution: no resize)


def flat(first, second, slack: float) -> bool:
    return first is not None and second <= 1.25 * first + slack


def job(shards: Path, out: Path, env: dict, store_limit: int = 0, **settings) -> tuple:
    """job/run.run over `shards` with the null backbone and `env` set (forwarded to the workers);
    its lines go to out/job.log. `store_limit` (bytes; 0: Ray Data's default, a share of the object
    store) caps what Ray Data lets its stages keep in the object store. Returns (summary, Watch,
    seconds after Ray start-up)."""
    from ilias_ray.config import Config
    from ilias_ray.job.run import run
    from ilias_ray.job.session import init_ray, stop_ray

    cfg = Config(
        dataset_dir=str(shards),
        hdf5_dir=str(out),
        partition="distractors",
        framework="null",
        model=MODEL,
        resolution=SIDE,
        pretrained=False,
        **settings,
    )
    out.mkdir(parents=True)
    limits = ray.data.DataContext.get_current().execution_options
    default = limits.resource_limits
    if store_limit:
        limits.resource_limits = default.copy(object_store_memory=store_limit)
    try:
        with environ(**env, ILIAS_RAY_TESTING="1"):
            init_ray(cfg)
            with Watch() as w, open(out / "job.log", "w") as log, contextlib.redirect_stdout(log):
                t = time.perf_counter()
                summary = run(cfg)
                seconds = time.perf_counter() - t
    finally:
        stop_ray()
        limits.resource_limits = default
    return summary, w, seconds


def cpu_split(w: Watch, seconds: float) -> dict:
    """CPU seconds per role, and the share of the machine's CPUs the run used."""
    roles = {k: round(v, 1) for k, v in sorted(w.cpu.items(), key=lambda kv: -kv[1])}
    return {"cpu_s_by_role": roles, "machine_cpu_busy": round(sum(roles.values()) / (seconds * os.cpu_count()), 2)}


def sink_section(shards: Path, tmp: Path, args) -> dict:
    summary, w, seconds = job(shards, tmp / "out_sink", {})
    rows = summary["rows"] + summary["skipped"]
    sink_cpu = w.cpu.get("sink actor", 0.0)
    out = {
        "sink_job_rows": rows,
        "sink_job_outputs": len(summary["written"]),
        "sink_job_s": round(seconds, 1),
        "sink_job_rows_per_s_steady": round(steady_rate(summary["timeline"])),
        "sink_job_rows_per_s_whole": round(rows / seconds),
        "sink_job_sink_busy": round(sink_cpu / seconds, 2),
        "sink_job_rows_per_sink_cpu_s": round(rows / max(sink_cpu, 1e-9)),
    }
    out.update({f"sink_job_{k}": v for k, v in cpu_split(w, seconds).items()})
    out.update(sink_scaling(tmp, args))
    return out


def fed_plan(out: Path, outputs: int, shards: int) -> Plan:
    """A Plan of `outputs` outputs of `shards` tar units each, in `out`."""
    one, fmt = one_output(out, shards)  # each sink keys its rows by output: the units may be the same
    return Plan([replace(one, index=o, name=f"features_distractors_{o:05d}.hdf5") for o in range(outputs)], fmt)


def fed_tables(outputs: int, shards: int, per_shard: int) -> list:
    """bench/sink_capacity's pre-made sink batches (D=1024 fp16, 256 rows, shuffled within windows)
    for each output, interleaved so that every output is in flight at once, as Arrow tables of one
    packed row each: the blocks the model stage hands the sink stage (stages/blocks.py)."""
    import pyarrow as pa

    from ilias_ray.stages.blocks import PACKED_SCHEMA, pack

    each = [batches(shards, per_shard, 256, 1024, out=o) for o in range(outputs)]
    return [
        pa.Table.from_arrays([pa.array([pack(b)], pa.binary())], schema=PACKED_SCHEMA)
        for group in zip(*each)
        for b in group
    ]


def fed_sinks(out: Path, sinks: int, outputs: int, rows: int, slow_ms: int = 0) -> dict:
    """The job's sink stage alone (job/dataset.sink_stage, as `run` builds it) with
    `sinks` sinks, fed pre-made rows of `outputs` outputs by Ray: rows/s, steady (between 10% and
    90%, from the progress rows), and rows per CPU-second of the sinks. slow_ms: each sink sleeps
    that long per row written (ILIAS_RAY_FAULT=sink_write:slow=MS): a sink that is the bound
    whatever the machine's cores, to show that the stage's rate grows with the sinks."""
    from ilias_ray.config import Config
    from ilias_ray.job.dataset import sink_stage
    from ilias_ray.job.session import init_ray, stop_ray

    per_shard = 500
    shards = max(1, rows // (outputs * per_shard))
    tables = fed_tables(outputs, shards, per_shard)
    out.mkdir(parents=True)
    plan = fed_plan(out, outputs, shards)
    slow = dict(ILIAS_RAY_TESTING="1", ILIAS_RAY_FAULT=f"sink_write:slow={slow_ms}") if slow_ms else {}
    try:
        with environ(**slow):
            init_ray(Config(dataset_dir=str(out), hdf5_dir=str(out)))
            ds, _ = sink_stage(ray, ray.data.from_arrow(tables), plan, sinks)
            timeline, done, t0 = [], {}, time.perf_counter()
            with Watch() as w:
                for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    done.update(zip(b["out"].tolist(), b["rows"].tolist()))
                    timeline.append((time.perf_counter() - t0, sum(done.values())))
                seconds = time.perf_counter() - t0
    finally:
        stop_ray()
    total = outputs * shards * per_shard
    assert timeline[-1][1] == total and all((out / o.name).exists() for o in plan.outputs)
    return {
        "rows": total,
        "rows_per_s_steady": round(steady_rate(timeline)),
        "rows_per_s_whole": round(total / seconds),
        "rows_per_sink_cpu_s": round(total / max(w.cpu.get("sink actor", 0.0), 1e-9)),
    }


def sink_scaling(tmp: Path, args) -> dict:
    """fed_sinks with 1, 2 and 4 sinks over 4 outputs: as they are (--fed_rows rows), and slowed
    to --scaling_slow_ms per row (--scaling_rows rows)."""
    out = {}
    for n in (1, 2, 4):
        for mode, rows, slow in (("", args.fed_rows, 0), ("slowed_", args.scaling_rows, args.scaling_slow_ms)):
            got = fed_sinks(tmp / f"fed_{mode}{n}", n, 4, rows, slow)
            out.update({f"fed_{mode}{n}_sinks_{k}": v for k, v in got.items()})
            print(f"[{n} sink(s) {mode or 'as is'}: {got['rows_per_s_steady']} rows/s]", file=sys.stderr, flush=True)
    return out


def memory_peaks(prefix: str, w: Watch, keys) -> dict:
    """Each series' peak (MiB, or a count), its first- and second-half peaks, and whether it is flat."""
    out = {}
    for key, scale, slack in keys:
        peak, first, second = w.peaks(key, scale)
        name = key.replace(" ", "_")
        unit = "mib" if scale == MIB else "n"
        out[f"{prefix}_{name}_peak_{unit}"] = peak
        out[f"{prefix}_{name}_halves_{unit}"] = f"{first} / {second}"
        out[f"{prefix}_{name}_flat"] = flat(first, second, slack)
    return out


def backpressure_section(shards: Path, tmp: Path, args) -> dict:
    env = {"ILIAS_RAY_FAULT": f"sink_write:slow={args.slow_ms}"}
    n = min(args.bp_shards, args.shards)
    summary, w, seconds = job(shards, tmp / "out_bp", env, args.bp_store_mib * MIB, total_tars=n)
    out = {
        "bp_store_limit_mib": args.bp_store_mib or "Ray Data's default",
        "bp_rows": summary["rows"] + summary["skipped"],
        "bp_s": round(seconds, 1),
        "bp_rows_per_s": round((summary["rows"] + summary["skipped"]) / seconds),
        "bp_store_capacity_mib": round(w.capacity / MIB),
    }
    keys = (("store", MIB, 64), ("spilled", MIB, 0), ("driver rss", MIB, 64), ("sink actor rss", MIB, 64))
    out.update(memory_peaks("bp", w, keys))
    return out


def outputs_section(shards: Path, tmp: Path, args) -> dict:
    summary, w, seconds = job(shards, tmp / "out_many", {}, tar_batch_size=1)
    out = {
        "outputs_files": len(summary["written"]),
        "outputs_rows": summary["rows"] + summary["skipped"],
        "outputs_s": round(seconds, 1),
        "outputs_rows_per_s": round((summary["rows"] + summary["skipped"]) / seconds),
    }
    keys = (("sink fds", 1, 16), ("sink actor rss", MIB, 64), ("driver rss", MIB, 64), ("store", MIB, 64))
    out.update(memory_peaks("outputs", w, keys))
    return out


def planning_section(tmp: Path, args) -> dict:
    """bench/selected_ids.py's planning, in its own process: its peak RSS is the planning's alone."""
    path = tmp / "planning.json"
    cmd = [sys.executable, str(HERE / "selected_ids.py"), "--plan_only", "--shards", "1000"]
    subprocess.run(cmd + ["--ids", str(args.ids), "--json", str(path)], check=True, stdout=subprocess.DEVNULL)
    import json

    got = json.loads(path.read_text())
    return {f"planning_{k}": got[k] for k in ("shards", "ids", "plan_s", "plan_peak_rss_mib", "rss_before_plan_mib")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--per_shard", type=int, default=25)
    ap.add_argument("--ids", type=int, default=5_000_000, help="--selected_ids length for the planning")
    ap.add_argument("--fed_rows", type=int, default=200_000, help="rows for the sinks fed by Ray alone")
    ap.add_argument("--scaling_rows", type=int, default=20_000, help="rows for the slowed sinks fed by Ray alone")
    ap.add_argument("--scaling_slow_ms", type=int, default=1, help="ms a slowed sink sleeps per row written")
    ap.add_argument("--slow_ms", type=int, default=10, help="ms the slowed sink sleeps per row written")
    ap.add_argument("--bp_shards", type=int, default=200, help="shards of the backpressure run")
    ap.add_argument(
        "--bp_store_mib", type=int, default=4, help="Ray Data's object store budget in that run (0: its default)"
    )
    ap.add_argument("--only", choices=("planning", "sink", "backpressure", "outputs"), default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway local cluster, as in the tests

    tmp = Path(tempfile.mkdtemp(prefix="ilias-bench-scale-"))
    res = machine()
    res.update(shards=args.shards, per_shard=args.per_shard, dim=1024, dtype="float16")
    sections = {
        "planning": planning_section,
        "sink": sink_section,
        "backpressure": backpressure_section,
        "outputs": outputs_section,
    }
    todo = [args.only] if args.only else list(sections)
    if todo != ["planning"]:
        t = time.perf_counter()
        make_shards(tmp / "shards", args.shards, args.per_shard, SIDE)
        res["build_shards_s"] = round(time.perf_counter() - t, 1)
    for name in todo:
        t = time.perf_counter()
        run = sections[name]
        res.update(run(tmp, args) if name == "planning" else run(tmp / "shards", tmp, args))
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    return report(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
