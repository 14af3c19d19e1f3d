"""Growth on Ray's autoscaler (`ray.cluster_utils.AutoscalingCluster`, in its own process), from no
worker node: the model pool reaches --model_actors GPU nodes when the model is the bound, the CPU
nodes the autoscaler adds decode when decoding is, and no idle node outlives a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ilias_ray.testing.faults import read_trace

SCRIPT = Path(__file__).parent / "scripts" / "autoscale.py"


def decode_rates(events: list) -> tuple:
    """Rows decoded per second in the first and in the second half of the decoding's time span."""
    start, end = min(e["t0"] for e in events), max(e["t1"] for e in events)
    mid = (start + end) / 2
    first = sum(e["rows"] for e in events if e["t1"] <= mid)
    second = sum(e["rows"] for e in events if e["t1"] > mid)
    return first / (mid - start), second / (end - mid)


def most_at_once(events: list) -> int:
    """The most decode tasks that ran at the same time."""
    edges = sorted([(e["t0"], 1) for e in events] + [(e["t1"], -1) for e in events])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    return peak


def test_growth_on_the_autoscaler(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `ray start`, `ray stop`
    p = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("REPORT ")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(lines[0][len("REPORT ") :])
    a, b = report["A"], report["B"]

    # A, the model is the bound: from no worker node to 4 GPU nodes, and forward passes on all 4.
    assert a["rows"] == 240 and a["max_gpu_nodes"] == 4, a
    forward_nodes = {e["node"] for e in read_trace(tmp_path / "trace_a") if e["event"] == "forward"}
    assert len(forward_nodes) == 4 and all(a["kinds"][n] == "gpu" for n in forward_nodes), (forward_nodes, a)

    # B, decoding is the bound: CPU-only nodes were added and decoded most of the images, on more CPUs
    # at once than any one node has to spare (a GPU node one, a CPU node two), and the decode rate
    # grew with them (a decode task's own rate is fixed: 200 ms an image).
    assert b["rows"] == 800 and b["max_cpu_nodes"] >= 2, b
    decodes = [e for e in read_trace(tmp_path / "trace_b") if e["event"] == "decode"]
    on_cpu_nodes = [e for e in decodes if b["kinds"].get(e["node"]) == "cpu"]
    assert len({e["node"] for e in on_cpu_nodes}) >= 2, b
    assert sum(e["rows"] for e in on_cpu_nodes) > sum(e["rows"] for e in decodes) / 2, b
    assert most_at_once(decodes) >= 3, b
    early, late = decode_rates(decodes)
    assert late > 1.3 * early, (early, late)

    # After each run: Ray Data's request to the autoscaler (there was one) is withdrawn, and the idle
    # timeout (12 s) takes every worker node away.
    for run in (a, b):
        assert run["requested_max"] > 0 and run["request_after"] == [], run
        assert run["workers_after"] == 0 and run["released_s"] < 60, run
