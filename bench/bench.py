"""Throughput benchmark: decode floor, model floor, and the whole job, measured in one run.

    .venv/bin/python bench/bench.py --images 2000 --model mobilenetv3_small_050 --resolution 512

(a) decode floor: one process decoding and resizing the benchmark's JPEGs (images/s per core);
(b) model floor: the backbone alone (the model stage's `embed_pixels`) on pre-made batches of the
    same shapes; (c) the whole `ilias-ray extract` job on the same shards, excluding and including
    Ray start-up. `ideal` is what perfect overlap of (a) on all CPUs with (b) would give: on a GPU,
    min(a * cpus, b); on a CPU, where the model uses the same cores, 1 / (1 / (a * cpus) + 1 / b).
Prints a table and writes the numbers as JSON (--json).
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ilias_ray.config import Config  # noqa: E402
from ilias_ray.preprocess import prepare  # noqa: E402
from ilias_ray.sample import build_yfcc_like  # noqa: E402


def jpegs(shards) -> list:
    out = []
    for path in shards:
        with tarfile.open(path) as tf:
            out += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return out


def decode_floor(data: list, cfg: dict) -> tuple:
    t = time.perf_counter()
    arrays = [prepare(d, False, None, cfg)[0] for d in data]
    return len(data) / (time.perf_counter() - t), arrays


def model_floor(arrays: list, cfg: dict) -> float:
    from ilias_ray.embed import Embedder

    emb = Embedder(cfg)
    groups = defaultdict(list)
    for a in arrays:
        groups[a.shape].append(a)
    batches = [torch.from_numpy(np.stack(g[i : i + cfg["batch_size"]]))
               for g in groups.values() for i in range(0, len(g), cfg["batch_size"])]
    emb.embed_pixels(batches[0])  # warm-up
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for b in batches:
        emb.embed_pixels(b)
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    return len(arrays) / (time.perf_counter() - t)


def end_to_end(cfg: Config) -> tuple:
    from ilias_ray.pipeline import init_ray, run

    t0 = time.perf_counter()
    init_ray(cfg)
    import ray

    ray.data.range(1).materialize()  # the cluster is up and Ray Data ready
    t1 = time.perf_counter()
    summary = run(cfg)
    t2 = time.perf_counter()
    n = summary["rows"] + summary["skipped"]
    return n / (t2 - t1), n / (t2 - t0), t1 - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--model", default="mobilenetv3_small_050")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ilias_ray_bench"))
    p.add_argument("--json", default=None, help="write the results here")
    args, extra = p.parse_known_args()

    shard_dir = os.path.join(args.workdir, f"yfcc_{args.images}")
    if not os.path.isdir(shard_dir):
        build_yfcc_like(shard_dir, args.images)
    shards = sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir) if f.endswith(".tar"))
    out_dir = tempfile.mkdtemp(dir=args.workdir)
    cfg = Config(dataset_dir=shard_dir, hdf5_dir=out_dir, partition="distractors", model=args.model,
                 resolution=args.resolution, batch_size=args.batch_size, pretrained=False,
                 tar_batch_size=len(shards), overwrite=True)
    c = dataclasses.asdict(cfg)
    cpus = os.cpu_count()
    data = jpegs(shards)
    a, arrays = decode_floor(data, c)
    b = model_floor(arrays, c)
    gpu = torch.cuda.is_available()
    ideal = min(a * cpus, b) if gpu else 1 / (1 / (a * cpus) + 1 / b)
    c_steady, c_total, startup = end_to_end(cfg)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {cpus} CPUs"
                   + (f", {torch.cuda.get_device_name(0)}" if gpu else ", no GPU"),
        "images": len(data), "model": args.model, "resolution": args.resolution,
        "decode_floor_per_core": round(a, 1), "decode_floor_all_cpus": round(a * cpus, 1),
        "model_floor": round(b, 1), "ideal": round(ideal, 1),
        "end_to_end_steady": round(c_steady, 1), "end_to_end_with_startup": round(c_total, 1),
        "ray_startup_s": round(startup, 2), "efficiency": round(c_steady / ideal, 3),
    }
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
