"""The cluster bench's analysis (cluster.py): from one measured job's trace, progress and probes
(cluster_probes.py), its steady window, each stage's rate in it, the capacities and the ideal,
what is saturated, the CPU by role per 1,000 rows; and the markdown table of all the runs.
"""

import os
from collections import defaultdict

import numpy as np

from cluster_probes import RoleWatch, Tail, Ticks
from measure import steady_rate

BATCH = 16  # images per forward pass (--batch_size and --webdl_batch_size)
ORCHESTRATION = ("driver", "raylets", "sink-stage tasks", "sinks")
STEADY_END = 0.95  # the steady window ends by this fraction of the rows through the model
OPEN_BY = 0.6  # ... and opens by this fraction, without the model actors that were not up yet


def decoded(events: list, t0: float, t1: float) -> tuple:
    """(rows decoded, decode task-seconds) in [t0, t1], each task counted for its part inside."""
    rows = busy = 0.0
    for e in events:
        inside = max(0.0, min(e["t1"], t1) - max(e["t0"], t0))
        busy += inside
        rows += e["rows"] * inside / max(e["t1"] - e["t0"], 1e-9)
    return rows, busy


def steady(passes: list, decodes: list, forward_s: float) -> dict:
    """The window where both stages run, and each stage's rate in it. It opens when the model
    actors have each made a first pass (their start-up and the first backlog stay out), leaving
    out an actor that came so late that less than OPEN_BY of the model's rows were left (it counts
    as missing), and closes when decoding ends, or at STEADY_END of the model's rows if that is
    earlier (the last passes are shards' leftovers). The steady rate is the slower stage's in it:
    the model stage's alone would count its catch-up on the backlog decoded while the actors
    started, decoding's alone a backlog still filling. But if the model actors that are up were
    busy (forward_s per pass) through the window, or decoding ended early in it (most was decoded
    while the actors started), the model stage's rate: it is the bound."""
    first = {}
    for t, node, _ in passes:
        first.setdefault(node, t)
    times = np.array([t for t, _, _ in passes])
    rows = np.cumsum([r for _, _, r in passes])
    w_end = float(times[np.searchsorted(rows, STEADY_END * rows[-1])])
    late = float(times[np.searchsorted(rows, OPEN_BY * rows[-1])])
    w0 = max(t for t in first.values() if t <= late)
    w1 = min(w_end, max(e["t1"] for e in decodes))
    both = w1 - w0 >= max(3.0, 0.5 * (w_end - w0))  # decoding ran through most of the window
    w1 = w1 if both else w_end
    inside = [(t, r) for t, _, r in passes if w0 < t <= w1]
    span = max(w1 - w0, 1e-9)
    model = sum(r for _, r in inside) / span
    dec_rows, dec_busy = decoded(decodes, w0, w1)
    up = sum(t <= w0 for t in first.values())
    saturated = len(inside) * forward_s / (up * span) >= 0.85  # the model actors that are up are busy
    out = dict(w0=w0, w1=w1, span=span, model=model, decode=dec_rows / span, busy=dec_busy, passes=inside)
    out.update(rate=min(model, dec_rows / span) if both and not saturated else model, firsts=sorted(first.values()))
    out["gpus_up"] = up
    return out


def per_node(events: list) -> dict:
    out = defaultdict(int)
    for node in events:
        out[node] += 1
    return dict(out)


def balance(counts: dict, nodes: int) -> float:
    """Least / most work of one node (0 when a node did none)."""
    xs = list(counts.values()) + [0] * (nodes - len(counts))
    return round(min(xs) / max(max(xs), 1), 2)


def capacities(nodes: int, cpus: int, decode_ms: int, forward_ms: int, per_pass: float) -> dict:
    decode = nodes * (cpus - 1) * 1000 / decode_ms
    gpu = nodes * 1000 / forward_ms * per_pass
    return {
        "decode_cap": round(decode, 1),
        "gpu_cap": round(gpu, 1),
        "gpu_cap_full_passes": round(nodes * 1000 / forward_ms * BATCH, 1),
        "ideal": round(min(decode, gpu), 1),
        "binds": "decode" if decode < gpu else "gpu",
    }


def saturated(res: dict) -> str:
    """What the measurements say is at its limit: decode slots, GPUs, the host's cores."""
    out = []
    if res["decode_concurrency"] >= 0.9 * res["decode_slots"]:
        out.append("decode")
    if res["gpu_busy"] >= 0.9:
        out.append("gpu")
    if res["host_cpu_busy"] >= 0.85:
        out.append("host CPU")
    return " + ".join(out) or "none"


def cpu_by_role(watch: RoleWatch, tail: Tail, ticks: Ticks, w: dict, res: dict) -> dict:
    """Host CPU busy and CPU-seconds per 1,000 rows by role in the window, less what the idle
    cluster costs in that time (res["idle"]) and less the samplers' own CPU (off the driver's)."""
    cpu, span = watch.window(w["w0"], w["w1"], ticks.ticks)
    total = max(watch.samples[-1]["t"], 1e-9)
    own = (watch.own_cpu + tail.own_cpu + ticks.own_cpu) * span / total
    cpu["driver"] = max(0.0, cpu.get("driver", 0.0) - own)
    rows = res["rate"] * span
    idle = res.pop("idle")
    work = {k: max(0.0, v - idle.get(k, 0.0) * span) for k, v in cpu.items()}
    return {
        "host_cpu_busy": round(sum(cpu.values()) / (span * os.cpu_count()), 2),
        "cpu_s_per_1000_rows": {k: round(1000 * v / rows, 3) for k, v in sorted(work.items())},
        "cpu_s_per_1000_rows_with_idle": {k: round(1000 * v / rows, 3) for k, v in sorted(cpu.items())},
        "idle_cluster_cpu_per_s": {k: round(v, 3) for k, v in sorted(idle.items())},
        "sampler_cpu_s_per_1000_rows": round(1000 * own / rows, 3),
        "cpu_s_per_row_all": sum(cpu.values()) / rows,
    }


def analyse(summary: dict, probes: tuple, events: list, setting: dict, cpus: int) -> dict:
    watch, tail, ticks = probes
    nodes = setting["nodes"]
    decodes = [e for e in events if e["event"] == "decode"]
    passes = [e for e in events if e["event"] == "forward"]
    w = steady(tail.passes, decodes, setting["forward_ms"] / 1000)
    per_pass = sum(r for _, r in w["passes"]) / max(len(w["passes"]), 1)
    res = dict(setting, rows=summary["rows"] + summary["skipped"], wall_s=round(summary["wall_s"], 1))
    res.update(w0=w["w0"], firsts=w["firsts"])
    res.update(capacities(nodes, cpus, setting["decode_ms"], setting["forward_ms"], per_pass))
    res.update(rate=round(w["rate"], 1), efficiency=round(w["rate"] / res["ideal"], 2), window_s=round(w["span"], 1))
    res.update(model_stage_rate=round(w["model"], 1), decode_stage_rate=round(w["decode"], 1))
    res["sink_rate_10_90"] = round(steady_rate(summary["timeline"]), 1)  # rows written (the driver's progress)
    res.update(rows_per_pass=round(per_pass, 2), passes=len(passes), decode_slots=nodes * (cpus - 1))
    res["rows_per_pass_whole_run"] = round(sum(e["rows"] for e in passes) / max(len(passes), 1), 2)
    res["decode_concurrency"] = round(w["busy"] / w["span"], 2)
    res["gpu_busy"] = round(len(w["passes"]) * setting["forward_ms"] / 1000 / (nodes * w["span"]), 2)
    res["gpus_up"] = w["gpus_up"]
    res["node_balance_passes"] = balance(per_node(e["node"] for e in passes), nodes)
    res["node_balance_decode_tasks"] = balance(per_node(e["node"] for e in decodes), nodes)
    res.update(cpu_by_role(watch, tail, ticks, w, res))
    res["saturated"] = saturated(res)
    return res


def table(results: list) -> str:
    head = (
        "| costs, ms (decode / forward) | GPU nodes | shards | rows | steady img/s | decode cap | GPU cap (rows/pass) "
        "| ideal | efficiency | binds | decode concurrency | GPUs up (busy) | host CPU busy | saturated "
        "| driver | raylets | sink-stage tasks | sinks | all roles |"
    )
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    for r in results:
        cpu = r["cpu_s_per_1000_rows"]
        roles = " | ".join(f"{cpu.get(k, 0.0):.2f}" for k in ORCHESTRATION) + f" | {sum(cpu.values()):.2f}"
        lines.append(
            f"| {r['regime']} ({r['decode_ms']} / {r['forward_ms']}) | {r['nodes']} | {r['shards']} | {r['rows']:,} "
            f"| {r['rate']:,.1f} | {r['decode_cap']:,.0f} | {r['gpu_cap']:,.0f} ({r['rows_per_pass']:.1f}) "
            f"| {r['ideal']:,.0f} | {r['efficiency']:.2f} | {r['binds']} "
            f"| {r['decode_concurrency']:.1f} of {r['decode_slots']} "
            f"| {r['gpus_up']} of {r['nodes']} ({r['gpu_busy']:.2f}) "
            f"| {r['host_cpu_busy']:.2f} | {r['saturated']} | {roles} |"
        )
    return "\n".join(lines)
