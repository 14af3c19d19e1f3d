"""Sink capacity: rows per second that one sink (stages/sink.Sink, the actor's own work, without Ray's
transport) takes at D=1024 in fp16, the size of SigLIP-L features.

    .venv/bin/python bench/sink_capacity.py --rows 200000 --per_shard 10000 --batch 256

Batches are built before the clock starts, as the model stage sends them: the sink's columns, one
feature of 2 KiB per row, rows shuffled inside windows of 4 batches (Ray delivers them out of
order), every shard ending with its END row. The clock covers every `Sink.__call__`
(reordering, per-shard part files, records) and the final assembly of the HDF5 file, which is
also timed alone. Goal (issue 13): 50,000 rows/s, 50 GPUs at 1,000 img/s each. --json writes it.
"""

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from ilias_ray.plan_types import Output, OutputFormat, Source, Unit
from ilias_ray.stages.rows import State
from ilias_ray.stages.sink import Sink
from ilias_ray.storage.location import Location
from ilias_ray.testing.batches import sink_batch
from measure import report


def batches(shards: int, per_shard: int, size: int, dim: int, out: int = 0) -> list:
    """The model stage's output for `shards` shards of `per_shard` images of output `out`, in
    batches of `size` (testing/batches.sink_batch: a (1, dim) fp16 vector per row)."""
    rows = []
    for u in range(shards):
        rows += [(u, p, State.FEATURES) for p in range(per_shard)] + [(u, per_shard, State.END)]
    rng = np.random.default_rng(1)
    window = 4 * size
    order = np.concatenate(
        [rng.permutation(np.arange(s, min(s + window, len(rows)))) for s in range(0, len(rows), window)]
    )
    return [sink_batch([rows[i] for i in order[s : s + size]], dim, out=out) for s in range(0, len(order), size)]


def one_output(tmp: Path, shards: int) -> tuple:
    """One Output of `shards` tar units in `tmp` (the batches' `out` 0), and the run's
    OutputFormat: fp16, no compression."""
    output = Output(
        index=0,
        name="features_distractors_00000.hdf5",
        dir=Location.of(str(tmp)),
        units=tuple(Unit(u, 0, Source.TAR, f"{u:05d}.tar") for u in range(shards)),
        settings={"bench": 1},
    )
    return output, OutputFormat(dtype="float16", compression=0, per_token=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--per_shard", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shards = max(1, args.rows // args.per_shard)
    work = batches(shards, args.per_shard, args.batch, args.dim)
    tmp = Path(tempfile.mkdtemp(prefix="ilias-bench-sink-"))
    spec, run = one_output(tmp, shards)
    sink = Sink([spec], run)
    writer = sink.writers[0]
    calls, t0 = [], time.perf_counter()
    for b in work[:-1]:
        t = time.perf_counter()
        sink(b)
        calls.append(time.perf_counter() - t)
    t = time.perf_counter()
    sink(work[-1])  # holds the last END row: this call also assembles the file
    last = time.perf_counter() - t
    total = time.perf_counter() - t0
    assert writer.finished and (tmp / spec.name).exists()
    rows = shards * args.per_shard
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rows": rows,
        "dim": args.dim,
        "batch": args.batch,
        "shards": shards,
        "rows_per_s_with_assembly": round(rows / total),
        "rows_per_s_streaming": round(rows / sum(calls)) if calls else None,
        "last_call_with_assembly_s": round(last, 2),
        "file_mib": round((tmp / spec.name).stat().st_size / 2**20, 1),
        "goal_rows_per_s": 50_000,
    }
    report(out, args.json)


if __name__ == "__main__":
    main()
