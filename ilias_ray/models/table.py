"""`ilias-ray models`: the benchmark's model table and whether each row runs offline here."""

from __future__ import annotations

import csv
from importlib import resources

from ilias_ray.config import FRAMEWORKS
from ilias_ray.errors import UserError
from ilias_ray.models.registry import framework


def benchmark_rows() -> list:
    """Rows of the ILIAS model table (label, framework, model, pooling, resolution, has_text)."""
    text = resources.files("ilias_ray.models").joinpath("benchmark.tsv").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = lines[0].lstrip("# ").split("\t")
    return [dict(zip(header, row)) for row in csv.reader(lines[1:], delimiter="\t")]


def status(fw: str, model: str) -> str:
    """How this row can run here: weights cached, download needed, checkpoint needed, or not built."""
    if fw not in FRAMEWORKS:
        return "framework not available yet"
    try:
        w = framework(fw).spec(model).weights
    except UserError:
        return "needs --checkpoint (no public hub name)"
    if not w.public:
        return "needs --checkpoint"
    return {True: "yes (weights cached)", False: "no (downloads weights)", None: "unknown"}[w.cached]


def print_table(out=print) -> None:
    rows = benchmark_rows()
    table = [("label", "framework", "model", "pooling", "res", "text", "offline here")]
    for r in rows:
        table.append(
            (
                r["label"],
                r["framework"],
                r["model"],
                r["pooling"],
                r["resolution"],
                r["has_text"],
                status(r["framework"], r["model"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        out("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def describe(fw: str, model: str, out=print) -> None:
    s = framework(fw).spec(model)
    out(f"{fw}:{model}")
    out(f"  mean/std    {s.mean} / {s.std}")
    out(f"  padding     {'multiple of %d' % s.patch if s.patch else 'none'}")
    out(f"  poolings    {', '.join(s.poolings)}")
    out(f"  text tower  {'yes' if s.has_text else 'no'}")
    out(f"  weights     {s.weights.source} ({status(fw, model)})")
    if s.weights.hint:
        out(f"  offline     {s.weights.hint}")
