"""Fault injection for tests, off unless ILIAS_RAY_FAULT is set.

ILIAS_RAY_FAULT="SITE:ACTION[,SITE:ACTION...]" makes `hit(SITE)` do ACTION:
  raise   raise RuntimeError (a bug or a flaky library in that stage)
  exit    end the process at once, as a crash or an out-of-memory kill would
  enospc  raise OSError(ENOSPC), as a full disk would
  sleep   sleep 30 s (gives a test time to kill the run at that point)
With ILIAS_RAY_FAULT_ONCE=PATH a fault fires once in the whole run, across processes and actor
restarts: the first process to create PATH fires it, later ones see PATH and go on.
Sites: embed (a model batch), sink_write (a row written), assemble (building the final file).
"""

from __future__ import annotations

import errno
import os
import time


def hit(site: str) -> None:
    spec = os.environ.get("ILIAS_RAY_FAULT")
    if not spec:
        return
    for item in spec.split(","):
        where, _, action = item.partition(":")
        if where != site or not _first(site):
            continue
        if action == "raise":
            raise RuntimeError(f"injected fault at {site}")
        if action == "exit":
            os._exit(17)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {site})")
        if action == "sleep":
            time.sleep(30)


def _first(site: str) -> bool:
    once = os.environ.get("ILIAS_RAY_FAULT_ONCE")
    if not once:
        return True
    try:
        os.close(os.open(f"{once}.{site}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
