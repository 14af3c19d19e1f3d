"""mini-ILIAS at full size: planning and submitting 1,000 shards with a 5M-ID --selected_ids list.

    .venv/bin/python bench/selected_ids.py --shards 1000 --ids 5000000

Measured in one run, on the driver:
(a) planning (`make_plan`: list the shards, read the ID list, build the key set): seconds and the
    driver's peak resident memory;
(b) read tasks as Ray gets them (`IliasDatasource.get_read_tasks`, each task pickled with Ray's
    cloudpickle, as submission does): seconds and bytes per task, with the keys passed by
    reference (what the pipeline does: one `ray.put`) and, side by side, by value as before (a
    frozenset of str in each task's closure: one task is pickled, the total is extrapolated);
(c) the read stage run for real by Ray Data over every shard (one small JPEG each), filtered by
    the list: seconds from submission to the last row, and the driver's peak memory after it.
Shards are tiny, so the numbers are per-task overheads, not read throughput. Prints a table;
--json writes it. --plan_only stops after (a) (bench/scale.py runs it so, in its own process).
"""

import argparse
import io
import os
import platform
import resource
import tarfile
import tempfile
import time
from pathlib import Path

from measure import report


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_shards(root: Path, n: int, per_shard: int = 1, side: int = 16) -> list:
    """n shards of `per_shard` copies of one side x side JPEG each, keys 1000000*s + i; returns
    every key."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 30)).save(buf, "JPEG")
    jpg = buf.getvalue()
    root.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(n):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                key = str(1_000_000 * s + i)
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(jpg)
                tf.addfile(info, io.BytesIO(jpg))
                keys.append(key)
    return keys


def by_value(ids_path: Path, unit, shards: int) -> tuple:
    """As before: each task's closure held a frozenset of str. One task is pickled; returns its
    bytes and the seconds for all `shards` tasks (building the set once, pickling it per task)."""
    from ray import cloudpickle

    from ilias_ray.stages.read import read_tar

    t = time.perf_counter()
    keys = frozenset(line.strip() for line in open(ids_path))
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    one = len(cloudpickle.dumps(lambda u=unit: read_tar(u, keys)))
    return one, build_s + (time.perf_counter() - t) * shards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--ids", type=int, default=5_000_000)
    ap.add_argument("--plan_only", action="store_true", help="stop after (a), the planning")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np
    import ray
    from ray import cloudpickle

    from ilias_ray.config import Config
    from ilias_ray.plan.planner import make_plan
    from ilias_ray.stages.blocks import unpack
    from ilias_ray.stages.read import IliasDatasource
    from ilias_ray.stages.rows import State

    tmp = Path(tempfile.mkdtemp(prefix="ilias-bench-ids-"))
    keys = make_shards(tmp / "yfcc", args.shards)
    listed = keys[::2]  # every other shard's image is listed; the rest of the list matches nothing
    rng = np.random.default_rng(0)
    filler = (str(k) for k in rng.integers(10**9, 10**10, size=args.ids - len(listed)))
    with open(tmp / "ids.txt", "w") as f:
        f.writelines(f"{k}\n" for k in listed)
        f.writelines(f"{k}\n" for k in filler)
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "shards": args.shards, "ids": args.ids}
    out["rss_before_plan_mib"] = round(peak_rss_mib())

    cfg = Config(
        dataset_dir=str(tmp / "yfcc"),
        hdf5_dir=str(tmp / "out"),
        partition="distractors",
        selected_ids=str(tmp / "ids.txt"),
        tar_batch_size=args.shards,
        model="resnet18",
        pretrained=False,
    ).validate()
    t = time.perf_counter()
    plan = make_plan(cfg)
    out["plan_s"] = round(time.perf_counter() - t, 2)
    out["plan_peak_rss_mib"] = round(peak_rss_mib())
    out["keyset_mib"] = round(plan.selected_keys.keys.nbytes / 2**20, 1)
    if args.plan_only:
        return report(out, args.json)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
    t = time.perf_counter()
    ref = ray.put(plan.selected_keys)
    tasks = IliasDatasource(plan.units, ref).get_read_tasks(args.shards)
    sizes = [len(cloudpickle.dumps(task)) for task in tasks]
    out["by_reference_tasks_s"] = round(time.perf_counter() - t, 2)
    out["by_reference_bytes_per_task"] = max(sizes)

    one, seconds = by_value(tmp / "ids.txt", plan.units[0], args.shards)
    out["by_value_bytes_per_task"] = one
    out["by_value_tasks_s_extrapolated"] = round(seconds, 1)
    out["by_value_total_gib_extrapolated"] = round(one * args.shards / 2**30, 1)

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    t = time.perf_counter()
    ds = ray.data.read_datasource(IliasDatasource(plan.units, ref), override_num_blocks=args.shards)
    batches = ds.iter_batches(batch_size=None, batch_format="numpy")  # packed blocks (stages/blocks.py)
    rows = sum(int((b["state"] == State.BYTES).sum()) for packed in batches for b in unpack(packed))
    out["read_stage_s"] = round(time.perf_counter() - t, 1)
    out["read_stage_rows"] = rows
    out["driver_peak_rss_mib"] = round(peak_rss_mib())
    ray.shutdown()

    report(out, args.json)


if __name__ == "__main__":
    main()
