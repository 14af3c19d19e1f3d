"""Fault injection for tests. Inert in production: nothing here acts unless ILIAS_RAY_TESTING=1.

ILIAS_RAY_FAULT="SITE:ACTION[,SITE:ACTION...]" makes `hit(SITE)` do ACTION:
  raise   raise RuntimeError (a bug or a flaky library in that stage)
  exit    end the process at once, as a crash or an out-of-memory kill would
  enospc  raise OSError(ENOSPC), as a full disk would
  sleep   sleep 30 s (gives a test time to kill the run at that point)
  slow=MS sleep MS milliseconds at every hit (a run that takes long to stop part-way, at no CPU cost)
  oom>N   raise torch's OutOfMemoryError when the call handles more than N images
With ILIAS_RAY_FAULT_ONCE=PATH a fault fires once in the whole run, across processes and actor
restarts: the first process to create PATH.SITE fires it, later ones see it and go on.
Sites: decode (one image decoded, in the decode stage), embed (a model batch), forward (one
forward pass), sink_write (a row written), assemble (building the final file). `decode:slow=MS`
and `forward:slow=MS` make decoding and the model cost what a real CPU and GPU would, so that a
simulated cluster's many fake CPUs and GPUs can share this machine's few real cores.

ILIAS_RAY_TRACE=DIR (also only with the test switch) makes `trace(EVENT, ...)` append one JSON
line per decode task and per forward pass to DIR/PID.jsonl: benches and tests read from it how
many decode tasks ran at once and how full the forward passes were (`read_trace`).

The driver checks the setting once before any Ray work (`check`): a malformed value is one
line there, not a failure in every actor; a setting without the test switch is ignored, and
the run says so.
"""

from __future__ import annotations

import errno
import os
import re
import time
from typing import Optional

SITES = ("decode", "embed", "forward", "sink_write", "assemble")
ACTION = re.compile(r"^(raise|exit|enospc|sleep|oom>(\d+)|slow=(\d+))$")


def testing() -> bool:
    """The test switch: fault injection and test-only backbones (models.null) act only with it."""
    return os.environ.get("ILIAS_RAY_TESTING") == "1"


def active() -> bool:
    return testing() and bool(os.environ.get("ILIAS_RAY_FAULT"))


def parse(spec: str) -> list:
    """[(site, action, N)] of an ILIAS_RAY_FAULT value; ValueError with one line if malformed."""
    out = []
    for item in filter(None, (i.strip() for i in spec.split(","))):
        site, _, action = item.partition(":")
        m = ACTION.match(action)
        if site not in SITES or not m:
            raise ValueError(
                f"ILIAS_RAY_FAULT: {item!r} is not SITE:ACTION (sites: {', '.join(SITES)}; "
                "actions: raise, exit, enospc, sleep, oom>N, slow=MS)"
            )
        out.append((site, re.split("[>=]", action)[0], int(m.group(2) or m.group(3) or 0)))
    return out


def check() -> Optional[str]:
    """On the driver: raise UserError for a malformed setting; a notice if it will be ignored."""
    from ilias_ray.errors import UserError

    spec = os.environ.get("ILIAS_RAY_FAULT")
    if not spec:
        return None
    if not testing():
        return "ilias-ray: ILIAS_RAY_FAULT is ignored: fault injection acts only in tests (ILIAS_RAY_TESTING=1)"
    try:
        parse(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    return None


def hit(site: str, n: int = 0) -> None:
    if not active():
        return
    for where, action, limit in parse(os.environ["ILIAS_RAY_FAULT"]):
        if where == site and action == "slow":
            time.sleep(limit / 1000)
            continue
        if where != site or (action == "oom" and n <= limit) or not _first(site):
            continue
        if action == "raise":
            raise RuntimeError(f"injected fault at {site}")
        if action == "exit":
            os._exit(17)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {site})")
        if action == "sleep":
            time.sleep(30)
        if action == "oom":
            import torch

            raise torch.OutOfMemoryError(f"injected at {site}: {n} > {limit} images")


def tracing() -> bool:
    return testing() and bool(os.environ.get("ILIAS_RAY_TRACE"))


def trace(event: str, **fields) -> None:
    """Append {"event": event, "t": now, "node": Ray node id, **fields} to this process's trace
    file (only with ILIAS_RAY_TRACE)."""
    if not tracing():
        return
    import json

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    line = json.dumps(dict(event=event, t=time.time(), node=node, **fields))
    with open(os.path.join(os.environ["ILIAS_RAY_TRACE"], f"{os.getpid()}.jsonl"), "a") as f:
        f.write(line + "\n")


def read_trace(folder) -> list:
    """Every event that the processes of a run wrote under `folder`, as dicts."""
    import json
    from pathlib import Path

    return [json.loads(ln) for p in sorted(Path(folder).glob("*.jsonl")) for ln in p.read_text().splitlines() if ln]


def _first(site: str) -> bool:
    once = os.environ.get("ILIAS_RAY_FAULT_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(f"{once}.{site}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
