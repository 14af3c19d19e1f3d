"""What the driver prints while a run goes: one line per output file every few seconds, and one
when it finishes. Plain lines, flushed: they read the same in a terminal and in `ray job logs`."""

from __future__ import annotations

import sys
import time

from ilias_ray.plan_types import Plan


def say(msg: str) -> None:
    # Plain lines, flushed: they read the same in a terminal and in `ray job logs`.
    print(msg, file=sys.stdout, flush=True)


def fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """One line per output file every `every` seconds, and one when it finishes. Each count only
    grows: a progress row that arrives after a newer one of the same output changes nothing."""

    def __init__(self, plan: Plan, every: float = 5.0):
        self.names = [o.name for o in plan.outputs]
        self.state = {}
        self.every = every
        self.t0 = time.time()
        self.last = {}
        self.timeline = []  # (seconds since start, rows + skipped so far): bench/ reads steady rates

    def update(self, batch: dict) -> None:
        now = time.time()
        for i, o in enumerate(batch["out"]):
            o = int(o)
            st = dict(
                rows=int(batch["rows"][i]),
                skipped=int(batch["skipped"][i]),
                fraction=float(batch["fraction"][i]),
                finished=bool(batch["finished"][i]),
                truncated=int(batch["truncated"][i]),
                repeated_ids=int(batch["repeated_ids"][i]),
                retries=int(batch["retries"][i]),
            )
            # Progress rows reach the driver out of order (several sink-stage tasks are in flight):
            # an output's progress only grows, and once finished it stays finished.
            old = self.state.get(o)
            was_finished = bool(old and old["finished"])
            if old:
                st = {k: max(v, old[k]) for k, v in st.items()}
            self.state[o] = st
            if st["finished"] and not was_finished:
                self.line(o, now, done=True)
            elif not st["finished"] and now - self.last.get(o, self.t0) >= self.every:
                self.line(o, now)
        self.timeline.append((now - self.t0, sum(s["rows"] + s["skipped"] for s in self.state.values())))

    def line(self, o: int, now: float, done: bool = False) -> None:
        st = self.state[o]
        self.last[o] = now
        el = max(now - self.t0, 1e-6)
        n = st["rows"] + st["skipped"]
        rate = n / el
        f = st["fraction"]
        tail = "done" if done else f"{100 * f:5.1f}%  ETA {fmt_eta(el * (1 - f) / f) if f > 0 else '?'}"
        say(f"[{self.names[o]}] {st['rows']} rows, {st['skipped']} skipped  {rate:.1f} img/s  {tail}")

    def totals(self) -> dict:
        return {
            "rows": sum(s["rows"] for s in self.state.values()),
            "skipped": sum(s["skipped"] for s in self.state.values()),
            "finished": [self.names[o] for o, s in sorted(self.state.items()) if s["finished"]],
            "truncated_shards": sum(s["truncated"] for s in self.state.values()),
            "repeated_ids": sum(s["repeated_ids"] for s in self.state.values()),
            "read_retries": sum(s["retries"] for s in self.state.values()),
        }
