"""What several benches share: the one output format (`report`), the steady rate of a progress
timeline, and the samplers of a job's processes (`PeakMemory`: private memory by role; `Watch`:
the object store, RSS, open files and CPU by role), the machine's description and a scoped
environment.

Used by throughput.py, scale.py, cluster.py (through cluster_probes.py) and the smaller benches
(their `report`). Ray and psutil are imported where they are used, so that a bench that needs
only `report` (demo_time.py) does not import Ray; Ray goes first: it puts its bundled psutil on
the path.
"""

import contextlib
import json
import os
import platform
import threading
import time
from collections import defaultdict
from typing import Optional

import numpy as np

MIB = 2**20


def report(res: dict, path: Optional[str] = None) -> int:
    """The benches' one output format: a `key  value` table on stdout, and the same as JSON on request."""
    width = max(map(len, res))
    for k, v in res.items():
        print(f"{k.ljust(width)}  {v}")
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def steady_rate(timeline: list, lo: float = 0.1, hi: float = 0.9) -> float:
    """Rows/s between the moments `lo` and `hi` of the rows were done (linear interpolation)."""
    ts = np.array([0.0] + [t for t, _ in timeline])
    ns = np.array([0.0] + [n for _, n in timeline], dtype=float)
    total = ns[-1]
    t_lo, t_hi = np.interp([lo * total, hi * total], ns, ts)
    return (hi - lo) * total / max(t_hi - t_lo, 1e-9)


class Sampler:
    """A thread that runs `self.loop()` while the `with` block runs; `self.stop` is set at its end
    (a subclass's loop checks it, or waits on it between samples)."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def loop(self):
        raise NotImplementedError


class PeakMemory(Sampler):
    """Samples the private memory (USS: not counting the shared object store pages a worker maps)
    of a job's process and all its children (the local Ray cluster's raylet, workers and actors);
    keeps the peak of their sum and the largest single process of each role."""

    ROLES = (
        ("Sink", "sink actor"),
        ("Embedder", "model actors"),
        ("ReadIlias", "read+decode workers"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
    )

    def __init__(self, pid: int, every: float = 0.3):
        import ray  # noqa: F401  (Ray puts its bundled psutil on the path)

        # isort: split
        import psutil

        self.me = psutil.Process(pid)
        self.peak = defaultdict(int)
        self.total = 0  # the largest sum over all the job's processes at one moment
        self.every = every
        super().__init__()

    def role(self, p) -> str:
        if p.pid == self.me.pid:
            return "driver"
        cmd = " ".join(p.cmdline())
        return next((name for key, name in self.ROLES if key in cmd), None)

    def loop(self):
        while not self.stop.is_set():
            now = 0
            try:
                procs = [self.me] + self.me.children(recursive=True)
            except Exception:  # the job has ended
                break
            for p in procs:
                try:
                    uss = p.memory_full_info().uss
                    now += uss
                    role = self.role(p)
                    if role:
                        self.peak[role] = max(self.peak[role], uss)
                except Exception:  # processes come and go
                    pass
            self.total = max(self.total, now)
            time.sleep(self.every)

    def mib(self) -> dict:
        out = {"job total": round(self.total / 2**20)}
        out.update({f"largest {k}": round(v / 2**20) for k, v in sorted(self.peak.items())})
        return out


def machine() -> dict:
    import ray  # noqa: F401  (Ray puts its bundled psutil on the path)

    # isort: split
    import psutil
    import torch

    gpu = "GPU" if torch.cuda.is_available() else "no GPU"
    mem = psutil.virtual_memory().total / 2**30
    return {"machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, {mem:.1f} GiB, {gpu}"}


def store_reader():
    """A function returning the object store's bytes used and spilled so far (the raylet's stats)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def read() -> dict:
        st = get_memory_info_reply(state).store_stats
        return {"store": st.object_store_bytes_used, "spilled": st.spilled_bytes_total}

    return read


class Watch(PeakMemory):
    """Samples, every `every` s, the object store, the driver's and the sink's RSS and the sink's
    open files (`samples`), and adds each Ray process's CPU time since the last sample to its
    role (`cpu`). Roles are PeakMemory's (from the process titles). Ray is connected."""

    def __init__(self, every: float = 0.5):
        import ray

        super().__init__(os.getpid(), every)
        self.samples = []
        self.cpu = defaultdict(float)
        self.seen = {}  # pid -> CPU seconds at the last sample
        self.store = store_reader()
        self.capacity = ray.cluster_resources().get("object_store_memory", 0)  # bytes

    def __enter__(self):
        import psutil  # on the path: PeakMemory imported Ray

        for p in [self.me] + self.me.children(recursive=True):  # CPU spent before the run is not counted
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                self.seen[p.pid] = c.user + c.system
        return super().__enter__()

    def loop(self):
        import psutil

        t0 = time.monotonic()
        while not self.stop.is_set():
            s = {"t": time.monotonic() - t0}
            try:
                s.update(self.store())
            except Exception:  # noqa: BLE001 - the cluster is going away
                pass
            for p in [self.me] + self.me.children(recursive=True):
                try:
                    self.measure(p, s)
                except psutil.Error:  # processes come and go
                    pass
            self.samples.append(s)
            time.sleep(self.every)

    def measure(self, p, s: dict) -> None:
        role = self.role(p) or "other"
        with p.oneshot():
            c = p.cpu_times()
            now = c.user + c.system
            self.cpu[role] += now - self.seen.get(p.pid, 0.0)  # a new process: all of its CPU
            self.seen[p.pid] = now
            if role in ("driver", "sink actor"):
                s[f"{role} rss"] = p.memory_info().rss
            if role == "sink actor":
                s["sink fds"] = p.num_fds()

    def peaks(self, key: str, scale: float = MIB) -> tuple:
        """(peak over the run, peak in its first half, peak in its second half) of one series."""
        xs = [(s["t"], s[key]) for s in self.samples if key in s]
        if not xs:
            return (None, None, None)
        half = xs[-1][0] / 2
        first = max((v for t, v in xs if t <= half), default=0)
        second = max((v for t, v in xs if t > half), default=0)
        return tuple(round(v / scale, 1) for v in (max(first, second), first, second))


@contextlib.contextmanager
def environ(**env):
    """os.environ with `env` set, as it was again afterwards (init_ray forwards ILIAS_RAY_* to the
    workers of the cluster it starts)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
