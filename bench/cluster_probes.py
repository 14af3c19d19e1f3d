"""The cluster bench's probes (cluster.py): what each process of the simulated cluster is, and
samplers that run beside the job.

`RoleWatch`: measure.Watch with this bench's roles, every process's CPU so far at each sample (a
window's CPU by role is read back). `Ticks`: a sampling profiler of the task workers (which task a
worker on a CPU runs, 20 times a second). `Tail`: the ILIAS_RAY_TRACE files read as they grow, each
forward pass stamped with the time it was seen. Each keeps its own CPU time (`own_cpu`), which the
analysis takes off the driver's.
"""

import contextlib
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from measure import Sampler, Watch

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
    """measure.Watch with this bench's roles (by each process's title, `ROLES`). Each sample keeps
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


class Ticks(Sampler):
    """A sampling profiler of the task workers: every `every` s, each one that is on a CPU (state R
    in /proc/PID/stat) counts a tick for the task its title names. The workers are looked up once a
    second (processes whose title is a task's or idle)."""

    def __init__(self, me, every: float = 0.05):
        self.me, self.every = me, every
        self.ticks, self.pids, self.own_cpu = [], [], 0.0
        super().__init__()

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


class Tail(Sampler):
    """Reads the trace files as they grow (every `every` s) and stamps each forward pass with the
    time it was seen: the trace has no times for passes, and the sink's progress (rows written in
    order) lags the model stage by whatever waits for a shard's rarer shapes."""

    def __init__(self, folder: Path, every: float = 0.2):
        self.folder, self.every = folder, every
        self.offsets, self.passes, self.own_cpu = {}, [], 0.0
        super().__init__()

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
