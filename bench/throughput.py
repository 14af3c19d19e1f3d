"""Throughput benchmark: floors, the whole job and a reference-style loop, measured in one run.

    .venv/bin/python bench/throughput.py --images 2000 --model mobilenetv3_small_050 --resolution 512

(a) decode floor: one process decoding and resizing the benchmark's JPEGs (images/s per core);
(b) model floor: the backbone alone (the model stage's `embed_pixels`, all CPU threads or the
    GPU) on pre-made batches of the same shapes;
(c) the whole `ilias-ray extract` job on the same shards: steady state (the rate between 10% and
    90% of the rows), the whole run without Ray start-up, and with it;
(d) a reference-style loop: one process with a torch DataLoader (the reference's default 8
    workers decoding, resizing and normalising to float tensors, batches grouped by aspect ratio),
    the model in the main process, features written at the end, as the ILIAS reference script
    does it (our own code following its documented behaviour, run on the CPU).
`ideal` is what perfect overlap of (a) on all CPUs with (b) would give: on a GPU,
min(a * cpus, b); on a CPU, where the model uses the same cores, 1 / (1 / (a * cpus) + 1 / b),
with (b) the better of one process on all cores and one thread's rate times the cores.
`--memory` also runs `ilias-ray extract` at two chunk sizes (images per output file) and reports
the peak private memory of its driver and of each kind of Ray worker.
`--s3` also measures read floors (bench/s3_read.py): images/s of the real read stage (`read_tar`)
over the same shards from their local directory and from a local S3 server (moto's, its own
process, shards uploaded to s3://ilias-bench/yfcc/), alone and followed by `decode_batch` (the
pipeline's fused read+decode task), in one process and in one process per CPU on disjoint shards;
best of 3, local and S3 repeats alternating; the S3/local ratios and the server's CPU seconds.
Shards should be several times storage.CHUNK (8 MiB): --per_shard 1000 gives about 36 MB.
`--only read` runs just those read floors (local only without --s3). Prints a table; --json writes it.

    .venv/bin/python bench/throughput.py --s3 --only read --images 4000 --per_shard 1000
"""

import argparse
import dataclasses
import os
import platform
import sys
import tarfile
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch

from ilias_ray.config import Config
from ilias_ray.stages.decode import prepare
from ilias_ray.testing.sample import build_yfcc_like
from measure import PeakMemory, report, steady_rate


def jpegs(shards) -> list:
    out = []
    for path in shards:
        with tarfile.open(path) as tf:
            out += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    return out


def decode_floor(data: list, cfg: dict) -> tuple:
    t = time.perf_counter()
    from ilias_ray.job.stage_args import decoder

    dec = decoder(Config(**cfg))
    arrays = [prepare(d, False, None, dec)[0] for d in data]
    return len(data) / (time.perf_counter() - t), arrays


def model_floor(
    arrays: list, cfg: dict, threads: int, channels_last=None, chunk_pixels=None, repeats: int = 2
) -> float:
    """Images/s of the model stage alone (best of `repeats` passes: this machine's timings are
    noisy); the keyword arguments override the stage's own choices."""
    from ilias_ray.job.stage_args import embedder_args
    from ilias_ray.stages.embed import Embedder

    before = torch.get_num_threads()
    emb = Embedder(**embedder_args(Config(**cfg)), threads=threads)
    if channels_last is not None:
        emb.set_channels_last(channels_last)
    if chunk_pixels is not None:
        emb.chunk_pixels = chunk_pixels
    groups = defaultdict(list)
    for a in arrays:
        groups[a.shape].append(a)
    batches = [
        torch.from_numpy(np.stack(g[i : i + cfg["batch_size"]]))
        for g in groups.values()
        for i in range(0, len(g), cfg["batch_size"])
    ]
    emb.embed_pixels(batches[0])  # warm-up
    if emb.device.type == "cuda":
        torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        for b in batches:
            emb.embed_pixels(b)
        if emb.device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, len(arrays) / (time.perf_counter() - t))
    torch.set_num_threads(before)
    return best


def pixel_columns(arrays: list) -> dict:
    """Seconds per 1,000 images to turn decoded pixels into a Ray block and back to numpy: as one
    ndarray column (what decode_batch ships) and, for comparison, as a bytes column."""
    from ray.data.block import BlockAccessor

    from ilias_ray.stages.decode import object_column

    out = {}
    for name, make in (("ndarray", object_column), ("bytes", lambda xs: object_column([x.tobytes() for x in xs]))):
        t = time.perf_counter()
        for i in range(0, len(arrays), 250):
            block = BlockAccessor.batch_to_block({"img": make(arrays[i : i + 250])})
            BlockAccessor.for_block(block).to_batch_format("numpy")
        out[name] = round(1000 * (time.perf_counter() - t) / len(arrays), 3)
    return out


def job_memory(shard_dir: str, out: str, per_file: int, args) -> dict:
    """Peak private memory per role of an `ilias-ray extract` job run as its own process."""
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "ilias_ray",
        "extract",
        "--dataset_dir",
        shard_dir,
        "--hdf5_dir",
        out,
        "--partition",
        "distractors",
        "--model",
        args.model,
        "--resolution",
        str(args.resolution),
        "--batch_size",
        str(args.batch_size),
        "--pretrained",
        "false",
        "--tar_batch_size",
        str(per_file),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    with PeakMemory(proc.pid) as mem:
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed")
    return mem.mib()


def end_to_end(cfg: Config) -> tuple:
    from ilias_ray.job.run import run
    from ilias_ray.job.session import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    import ray

    ray.data.range(1).materialize()  # the cluster is up and Ray Data ready
    t1 = time.perf_counter()
    summary = run(cfg)
    t2 = time.perf_counter()
    n = summary["rows"] + summary["skipped"]
    first = next(t for t, n in summary["timeline"] if n > 0)
    return steady_rate(summary["timeline"]), n / (t2 - t1), n / (t2 - t0), t1 - t0, first


def reference_style(shards: list, cfg: dict, workers: int, out_path: str) -> float:
    """Images/s of a reference-style extractor (see the module docstring), start-up included."""
    import io

    import h5py
    import torchvision.transforms.functional as TF
    from PIL import Image

    from ilias_ray.models.pooling import pool
    from ilias_ray.models.registry import build
    from ilias_ray.stages.decode import large_side_size

    t = time.perf_counter()
    bb = build(
        cfg["framework"],
        cfg["model"],
        checkpoint=cfg["checkpoint"],
        pretrained=cfg["pretrained"],
        trust_remote_code=cfg["trust_remote_code"],
    )  # in eval mode

    class Shards(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            mine = shards[info.id :: info.num_workers] if info else shards
            for path in mine:
                with tarfile.open(path) as tf:
                    for m in tf:
                        if not m.name.endswith(".jpg"):
                            continue
                        img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                        img = img.resize(large_side_size(img.width, img.height, cfg["resolution"]))
                        x = TF.normalize(TF.to_tensor(img), bb.mean, bb.std)
                        yield x, m.name[:-4]

    def by_aspect(batch):
        groups = defaultdict(list)
        for x, key in batch:
            groups[x.shape].append((x, key))
        return [(torch.stack([x for x, _ in g]), [k for _, k in g]) for g in groups.values()]

    loader = torch.utils.data.DataLoader(
        Shards(), batch_size=cfg["webdl_batch_size"], num_workers=workers, collate_fn=by_aspect
    )
    feats, ids = [], []
    with torch.inference_mode():
        for groups in loader:
            for x, keys in groups:
                for i in range(0, len(x), cfg["batch_size"]):
                    xb = x[i : i + cfg["batch_size"]]
                    if cfg["pooling"] == "head":
                        f = bb.head(xb)
                    else:
                        f = pool(cfg["pooling"], bb.features(xb), bb.token_pool)
                    feats.append(torch.nn.functional.normalize(f, dim=-1).half().numpy())
                ids += keys
    with h5py.File(out_path, "w") as f:
        f.create_dataset("index", data=ids, dtype=h5py.string_dtype("ascii"))
        f.create_dataset("features", data=np.concatenate(feats))
    return len(ids) / (time.perf_counter() - t)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--per_shard", type=int, default=250)
    p.add_argument("--model", default="mobilenetv3_small_050")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--skip_reference", action="store_true", help="skip (d), e.g. on a GPU machine")
    p.add_argument("--memory", action="store_true", help="also run the job at two chunk sizes (peak memory)")
    p.add_argument(
        "--variants",
        action="store_true",
        help="also measure the model stage and the pixel transfer with each CPU choice switched off",
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="also measure read floors from a local S3 server (moto) next to the local ones",
    )
    p.add_argument("--only", choices=["read"], default=None, help="read: run only the read floors")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ilias_ray_bench"))
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    shard_dir = os.path.join(args.workdir, f"yfcc_{args.images}_{args.per_shard}")
    if not os.path.isdir(shard_dir):
        build_yfcc_like(shard_dir, args.images, per_shard=args.per_shard)
    shards = sorted(os.path.join(shard_dir, f) for f in os.listdir(shard_dir) if f.endswith(".tar"))
    out_dir = tempfile.mkdtemp(dir=args.workdir)

    def config(**kw) -> Config:
        kw = {"tar_batch_size": len(shards), **kw}
        return Config(
            dataset_dir=shard_dir,
            hdf5_dir=out_dir,
            partition="distractors",
            model=args.model,
            resolution=args.resolution,
            batch_size=args.batch_size,
            pretrained=False,
            overwrite=True,
            **kw,
        )

    cfg = config()
    c = dataclasses.asdict(cfg)
    cpus = os.cpu_count()
    gpu = torch.cuda.is_available()
    reads = read_floors(shards, c, args.s3) if args.s3 or args.only == "read" else {}
    if args.only == "read":
        res = {"machine": f"{platform.processor() or platform.machine()}, {cpus} CPUs", "images": args.images, **reads}
        return report(res, args.json)
    data = jpegs(shards)
    a, arrays = decode_floor(data, c)
    # On a CPU the job runs one single-threaded model process per core: the floor is the better of
    # that (one thread's rate times the cores, an upper bound) and one process using every core.
    b1 = model_floor(arrays, c, threads=1)
    b_all = model_floor(arrays, c, threads=cpus)
    b = b_all if gpu else max(b_all, b1 * cpus)
    ideal = min(a * cpus, b) if gpu else 1 / (1 / (a * cpus) + 1 / b)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {cpus} CPUs"
        + (f", {torch.cuda.get_device_name(0)}" if gpu else ", no GPU"),
        "images": len(data),
        "model": args.model,
        "resolution": args.resolution,
        "decode_floor_per_core": round(a, 1),
        "decode_floor_all_cpus": round(a * cpus, 1),
        "model_floor": round(b, 1),
        "ideal": round(ideal, 1),
        **reads,
    }
    if not gpu:
        res["model_floor_one_thread"] = round(b1, 1)
        res["model_floor_all_threads_one_process"] = round(b_all, 1)
    if args.variants and not gpu:
        big = 1 << 40  # the whole --batch_size in one forward pass
        few = arrays[:500]
        res["model_one_thread_variants_500_images"] = {
            "as shipped": round(model_floor(few, c, 1, repeats=3), 1),
            "channels-last": round(model_floor(few, c, 1, channels_last=True, repeats=3), 1),
            "whole batch per pass": round(model_floor(few, c, 1, chunk_pixels=big, repeats=3), 1),
            "4 images per pass": round(model_floor(few, c, 1, chunk_pixels=4 * 512 * 384, repeats=3), 1),
        }
        res["pixel_transfer_s_per_1000_images"] = pixel_columns(arrays)
    if not args.skip_reference:
        ref_path = os.path.join(out_dir, "ref.hdf5")
        res["reference_style"] = round(reference_style(shards, c, cfg.num_workers, ref_path), 1)
    del data, arrays
    steady, whole, total, startup, first = end_to_end(cfg)
    res.update(
        {
            "end_to_end_steady": round(steady, 1),
            "end_to_end_without_startup": round(whole, 1),
            "end_to_end_with_startup": round(total, 1),
            "ray_startup_s": round(startup, 2),
            "first_features_after_s": round(first, 2),
            "efficiency": round(steady / ideal, 3),
        }
    )
    if "reference_style" in res:
        res["speedup_vs_reference_style"] = round(total / res["reference_style"], 2)
    if args.memory:
        import ray

        ray.shutdown()  # each measured job starts its own local cluster
        for per_file in (1, len(shards)):
            res[f"peak_uss_mib_{per_file * args.per_shard}_images_per_file"] = job_memory(
                shard_dir, os.path.join(out_dir, f"mem{per_file}"), per_file, args
            )
    return report(res, args.json)


def read_floors(shards: list, c: dict, s3: bool) -> dict:
    """The read floors of bench/s3_read.py, from the local directory and, with `s3`, from a moto
    server started (and stopped) here, the shards uploaded to it."""
    import s3_read  # a sibling: this script's folder is first on sys.path

    if not s3:
        return s3_read.read_floors(shards, c)
    if os.path.getsize(shards[0]) < 3 * s3_read.CHUNK:
        print(
            f"note: shards of {os.path.getsize(shards[0]) / 1e6:.1f} MB are under three {s3_read.CHUNK >> 20} MiB "
            "ranges; --per_shard 1000 gives about 36 MB",
            file=sys.stderr,
        )
    port = s3_read.free_port()
    env = s3_read.aws_env(port)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before this process or the workers make an S3 client
    moto = s3_read.start_moto(port)
    try:
        uri = s3_read.upload(shards)
        return s3_read.read_floors(shards, c, uri, moto.pid)
    finally:
        s3_read.stop(moto)
        for k, v in saved.items():  # the rest of the run (its Ray workers) sees the caller's environment
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    sys.exit(main())
