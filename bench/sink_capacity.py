"""Sink capacity: rows per second that one sink (sink.Sink, the actor's own work, without Ray's
transport) takes at D=1024 in fp16, the size of SigLIP-L features.

    .venv/bin/python bench/sink_capacity.py --rows 200000 --per_shard 10000 --batch 256

Batches are built before the clock starts, as the model stage sends them: the sink's columns, one
feature of 2 KiB per row, rows shuffled inside windows of 4 batches (Ray delivers them out of
order), every shard ending with its MARKER row. The clock covers every `Sink.__call__`
(reordering, per-shard part files, records) and the final assembly of the HDF5 file, which is
also timed alone. Goal (issue 13): 50,000 rows/s, 50 GPUs at 1,000 img/s each. --json writes it.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ilias_ray.hdf5_out import OutputSpec, RunInfo, UnitSpec  # noqa: E402
from ilias_ray.plan import seq_id  # noqa: E402
from ilias_ray.read import marker_note  # noqa: E402
from ilias_ray.rows import Kind  # noqa: E402
from ilias_ray.sink import Sink  # noqa: E402
from ilias_ray.storage import Location  # noqa: E402
from report import report  # noqa: E402

COLUMNS = ("seq", "out", "unit", "pos", "id", "kind", "note", "off", "feat", "nvec")


def batches(shards: int, per_shard: int, size: int, dim: int, out: int = 0) -> list:
    """The model stage's output for `shards` shards of `per_shard` images of output `out`, in
    batches of `size`."""
    feat = np.random.default_rng(0).standard_normal(dim).astype(np.float16).tobytes()
    rows = []
    for u in range(shards):
        rows += [(u, p, Kind.IMAGE) for p in range(per_shard)] + [(u, per_shard, Kind.MARKER)]
    rng = np.random.default_rng(1)
    window = 4 * size
    order = np.concatenate(
        [rng.permutation(np.arange(s, min(s + window, len(rows)))) for s in range(0, len(rows), window)]
    )
    made = []
    for s in range(0, len(order), size):
        cols = {k: [] for k in COLUMNS}
        for i in order[s : s + size]:
            u, p, kind = rows[i]
            marker = kind == Kind.MARKER
            cols["seq"].append(seq_id(u, p))
            cols["out"].append(out)
            cols["unit"].append(u)
            cols["pos"].append(p)
            cols["id"].append(f"{u:05d}.tar/" if marker else f"{u:05d}.tar/{u * 10**6 + p}")
            cols["kind"].append(int(kind))
            cols["note"].append(marker_note("eof", []) if marker else "")
            cols["off"].append(0)
            cols["feat"].append(b"" if marker else feat)
            cols["nvec"].append(0 if marker else 1)
        made.append(
            {k: np.array(v, dtype=object if k in ("id", "note", "feat") else np.int64) for k, v in cols.items()}
        )
    return made


def one_output(tmp: Path, shards: int) -> tuple:
    """The OutputSpec of one output of `shards` units in `tmp` (the batches' `out` 0), and the run's
    RunInfo: fp16, no compression."""
    spec = OutputSpec(
        name="features_distractors_00000.hdf5",
        dir=Location.of(str(tmp)),
        settings={"bench": 1},
        units=tuple(UnitSpec(u, f"{u:05d}.tar", None, 0, None) for u in range(shards)),
    )
    return spec, RunInfo(dtype="float16", compression=0, local=False)


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
    sink(work[-1])  # holds the last MARKER: this call also assembles the file
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
