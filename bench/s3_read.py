"""Read floors of the real read stage (`read_tar`), from a local directory and from a local S3
server (moto's), on the same shards, measured in one run (throughput.py --s3).

The server runs as its own process (pyarrow's S3 client holds the GIL in places, which deadlocks
against a server thread in the same process). The measurements run in persistent worker processes
(this file run as a script) that read the shards they are sent, as Ray read tasks do: one process
reading every shard in turn, and one process per core each reading a disjoint subset. A worker
counts sample rows (not the END row of each shard); with `decode` it also turns each table into
the numpy batch Ray Data hands `decode_batch` (read and decode are fused in one task in the
pipeline) and decodes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from ilias_ray.storage.ranged import CHUNK
from ilias_ray.testing.s3 import free_port, make_bucket, s3, start_moto  # noqa: F401 - throughput.py starts the server
from ilias_ray.testing.s3 import upload as copy_up

BUCKET, PREFIX = "ilias-bench", "yfcc"


# -- the server: the tests' own helpers (ilias_ray/testing/s3.py) --
def aws_env(port: int) -> dict:
    """What the S3 clients of this process and of the workers need: the local endpoint and dummy
    keys (set before pyarrow's S3 client is first made)."""
    return {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "bench-key",
        "AWS_SECRET_ACCESS_KEY": "bench-secret-not-real",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def stop(proc: subprocess.Popen) -> None:
    """Stop the one process we started (never by name: other servers may run on this machine)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (and children it has waited for)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def upload(shards: list) -> str:
    """The shards copied to s3://BUCKET/PREFIX/ (sizes checked); returns that URI."""
    make_bucket(BUCKET)
    for path in shards:
        dest = f"{BUCKET}/{PREFIX}/{os.path.basename(path)}"
        copy_up(Path(path), dest)
        got = s3().get_file_info(dest).size
        if got != os.path.getsize(path):
            raise RuntimeError(f"uploaded {got} of {os.path.getsize(path)} bytes of {path}")
    return f"s3://{BUCKET}/{PREFIX}"


# -- the workers --
class Workers:
    """`n` persistent worker processes; `run` sends each its list of shard names and waits for all."""

    def __init__(self, n: int, cfg: dict, bases: list, env: dict):
        self.procs = []
        for _ in range(n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), "--worker"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env={**os.environ, **env},
                    text=True,
                    bufsize=1,
                )
            )
        for p in self.procs:  # imports done, a filesystem per base made: start-up is not timed
            self._send(p, {"cfg": cfg, "bases": bases})
        for p in self.procs:
            self._recv(p)

    @staticmethod
    def _send(p, msg: dict) -> None:
        p.stdin.write(json.dumps(msg) + "\n")
        p.stdin.flush()

    @staticmethod
    def _recv(p) -> dict:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"read worker {p.pid} exited with {p.wait()}")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"read worker: {msg['error']}")
        return msg

    def run(self, base: str, parts: list, decode: bool) -> tuple:
        """(sample rows, bytes of their data, wall seconds) of the workers reading `parts[i]` each."""
        busy = [(p, names) for p, names in zip(self.procs, parts) if names]
        t = time.perf_counter()
        for p, names in busy:
            self._send(p, {"base": base, "names": names, "decode": decode})
        got = [self._recv(p) for p, _ in busy]
        wall = time.perf_counter() - t
        return sum(g["rows"] for g in got), sum(g["bytes"] for g in got), wall

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def read_floors(
    shards: list,
    cfg: dict,
    s3_uri: Optional[str] = None,
    moto_pid: Optional[int] = None,
    repeats: int = 3,
    procs: Optional[int] = None,
) -> dict:
    """Images/s of read_tar (and of read_tar + decode_batch) over all `shards`, from their local
    directory and, with `s3_uri`, from the bucket: best of `repeats`, local and S3 repeats
    alternating; in one process and in `procs` processes (default: the CPUs) on disjoint subsets."""
    procs = procs or os.cpu_count()
    local = os.path.dirname(os.path.abspath(shards[0]))
    names = [(os.path.basename(s), os.path.getsize(s)) for s in shards]  # sizes are the plan's, not timed
    sources = {"local": local}
    if s3_uri:
        sources["s3"] = s3_uri
    env = {k: os.environ[k] for k in aws_env(0) if k in os.environ}
    workers = Workers(procs, cfg, list(sources.values()), env)
    best = {}  # (what, source, n processes) -> (images/s, MB/s)
    moto_cpu = moto_wall = 0.0
    try:
        for r in range(repeats):
            order = list(sources) if r % 2 == 0 else list(reversed(sources))
            for decode in (False, True):
                for n in (1, procs):
                    parts = [names] if n == 1 else [names[i::n] for i in range(n)]
                    for src in order:
                        c0 = cpu_seconds(moto_pid) if src == "s3" and moto_pid else None
                        rows, nbytes, wall = workers.run(sources[src], parts, decode)
                        if c0 is not None:
                            moto_cpu += cpu_seconds(moto_pid) - c0
                            moto_wall += wall
                        key = ("read_decode" if decode else "read", src, n)
                        rate = (rows / wall, nbytes / wall / 1e6)
                        best[key] = max(best.get(key, (0.0, 0.0)), rate)
    finally:
        workers.close()

    sizes = [os.path.getsize(s) for s in shards]
    res = {
        "read_shards": len(shards),
        "read_shard_mb": round(sum(sizes) / len(sizes) / 1e6, 1),
        "read_shard_ranges": round(sum(sizes) / len(sizes) / CHUNK, 2),
        "read_processes": procs,
    }
    for what in ("read", "read_decode"):
        for n, tail in ((procs, ""), (1, "_one_process")):
            for src in sources:
                res[f"{what}_floor_{src}{tail}"] = round(best[(what, src, n)][0], 1)
            if what == "read":
                for src in sources:
                    res[f"read_mb_s_{src}{tail}"] = round(best[(what, src, n)][1], 1)
            if s3_uri:
                res[f"{what}_ratio{tail}"] = round(best[(what, "s3", n)][0] / best[(what, "local", n)][0], 3)
    if s3_uri and moto_pid:
        res["moto_cpu_s"] = round(moto_cpu, 2)
        res["moto_cpu_share"] = round(moto_cpu / max(moto_wall, 1e-9), 2)  # cores moto kept busy
    return res


def worker() -> int:
    """Serve `{"base", "names", "decode"}` lines on stdin with `{"rows", "bytes"}` lines."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the replies; anything libraries print goes to stderr
    os.dup2(2, 1)
    import pyarrow.compute as pc
    from ray.data.block import BlockAccessor

    from ilias_ray.config import Config
    from ilias_ray.job.stage_args import decoder
    from ilias_ray.plan_types import Source, Unit
    from ilias_ray.stages.decode import decode_batch
    from ilias_ray.stages.read import read_tar
    from ilias_ray.stages.rows import State
    from ilias_ray.storage.location import Location

    dec = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if "cfg" in msg:
                dec = decoder(Config(**msg["cfg"]))
                for base in msg["bases"]:
                    Location.of(base).info()  # the filesystem (and its S3 client) is made once per process
                out.write(json.dumps({"ready": True}) + "\n")
                continue
            rows = nbytes = 0
            for name, size in msg["names"]:
                unit = Unit(1, 0, Source.TAR, name, src=Location.of(msg["base"]) / name, size=size)
                for table in read_tar(unit, None):
                    samples = pc.not_equal(table["state"], State.END)
                    rows += pc.sum(samples).as_py() or 0
                    nbytes += pc.sum(pc.binary_length(table["data"])).as_py() or 0
                    if msg["decode"]:
                        decode_batch(BlockAccessor.for_block(table).to_batch_format("numpy"), dec)
            out.write(json.dumps({"rows": rows, "bytes": nbytes}) + "\n")
        except Exception as e:  # the parent raises it
            out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    sys.exit(worker())
