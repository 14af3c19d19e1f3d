"""`ilias-ray demo` before and after a change, side by side in one run.

    .venv/bin/python bench/demo_time.py --before 9de404d --rounds 2

The demo of `--before` (a commit of this repository, checked out into a temporary git worktree)
and of this checkout run in turns, `--rounds` times each, with the same venv. Each run is a fresh
`python -m ilias_ray demo` process in its own work folder (its own local Ray cluster), timed from
start to exit. Reported per side: every wall time, their mean, and the demo's own "s of
extraction" line (from the first job's start to the last job's end, without building the sample,
writing its checkpoint or verifying); then the ratios after / before. Prints a table; --json
writes it.
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import report

ROOT = Path(__file__).resolve().parent.parent


def demo_once(code: Path, workdir: Path) -> tuple:
    """(wall seconds, the demo's own extraction seconds) of one demo run of the code in `code`."""
    # On purpose: `code` may be another commit's checkout (--before), which the venv's editable install
    # of this checkout does not point at. PYTHONPATH comes before site-packages on sys.path, so the
    # demo's process (and the Ray workers it starts, which inherit it) import `code`'s ilias_ray.
    env = dict(os.environ, PYTHONPATH=str(code))
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "ilias_ray", "demo", "--workdir", str(workdir)],
        cwd=code,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    if p.returncode:
        sys.exit(f"demo_time: the demo of {code} failed: {(p.stderr or p.stdout).strip().splitlines()[-1]}")
    found = re.search(r"([\d.]+) s of extraction", p.stdout)
    return wall, float(found.group(1)) if found else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="commit whose demo is the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="demo_time_") as tmp:
        old = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.before], check=True)
        try:
            sides = {"before": old, "after": ROOT}
            times = {side: [] for side in sides}
            for r in range(args.rounds):
                for side, code in sides.items():
                    times[side].append(demo_once(code, Path(tmp) / f"{side}{r}"))
                    print(f"round {r + 1} {side}: {times[side][-1][0]:.1f} s", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "before": args.before}
    for side, runs in times.items():
        res[f"{side}: wall s"] = " ".join(f"{w:.1f}" for w, _ in runs)
        res[f"{side}: mean wall s"] = round(sum(w for w, _ in runs) / len(runs), 1)
        res[f"{side}: extraction s"] = " ".join(f"{e:.1f}" for _, e in runs)
    res["after / before (mean wall)"] = round(res["after: mean wall s"] / res["before: mean wall s"], 2)
    mean = {side: sum(e for _, e in runs) / len(runs) for side, runs in times.items()}
    res["after / before (mean extraction)"] = round(mean["after"] / mean["before"], 2)
    return report(res, args.json)


if __name__ == "__main__":
    sys.exit(main())
