"""Whole-model runs, as the reference's cluster script does them, in one driver (one submission).

For one model: image queries, positives, a range of distractor shards, and text queries when the
model has a text tower. A sweep runs that for rows of the benchmark's model table.
"""

from __future__ import annotations

import re
import sys

from ilias_ray.cli.flags import command_line
from ilias_ray.cli.main import guarded
from ilias_ray.config import Config
from ilias_ray.models.table import benchmark_rows
from ilias_ray.models.text import TEXT_MODELS
from ilias_ray.storage.location import child


def has_text_tower(framework: str, model: str) -> bool:
    for row in benchmark_rows():
        if row["framework"] == framework and row["model"] == model:
            return row["has_text"] == "true"
    return model in TEXT_MODELS


def model_configs(
    framework,
    model,
    core,
    yfcc,
    hdf5_dir,
    pooling=Config.default("pooling"),
    resolution=Config.default("resolution"),
    start_tar=0,
    total_tars=10,
    text="auto",
    settings=None,
) -> list:
    """One model's run, as Configs: the image partitions as one job (one model load), then the text
    queries when the model has a text tower. `settings` (e.g. from cli.flags.overrides) apply to
    every job."""
    partitions = ["image_queries", "positives"]
    shards = {}
    if yfcc:
        partitions.append("distractors")
        shards = dict(distractors_dir=yfcc, start_tar=start_tar, total_tars=total_tars)
    image = dict(framework=framework, model=model, pooling=pooling, resolution=resolution)
    jobs = [dict(partition=",".join(partitions), dataset_dir=core, **shards, **image)]
    if text == "true" or (text == "auto" and has_text_tower(framework, model)):
        jobs.append(dict(partition="text_queries", dataset_dir=core, framework="text", model=model))
    return [Config(**{**job, "hdf5_dir": hdf5_dir, **(settings or {})}) for job in jobs]  # settings win


def run_configs(cfgs: list) -> int:
    """Run each extraction in this process (one Ray connection); the first failure stops the run
    (its one line printed, as the CLI does)."""
    from ilias_ray.job.run import run

    for cfg in cfgs:
        print(f"\n== ilias-ray extract {command_line(cfg)}", flush=True)
        rc = guarded(run, cfg)
        if rc:
            return rc
    return 0


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_")


def select_rows(pattern: str) -> list:
    rx = re.compile(pattern)
    return [r for r in benchmark_rows() if rx.search(r["label"]) or rx.search(r["model"])]


def run_sweep(pattern, core, yfcc, hdf5_dir, start_tar=0, total_tars=10, settings=None) -> int:
    """Every matching table row into `hdf5_dir/<label>/`; a failing row is reported, the sweep goes on.
    `settings` apply to every job."""
    rows = select_rows(pattern)
    if not rows:
        print(f"ilias-ray: error: no row of the model table matches {pattern!r}", file=sys.stderr)
        return 2
    failed = []
    for r in rows:
        out = child(hdf5_dir, slug(r["label"]))
        cfgs = model_configs(
            r["framework"],
            r["model"],
            core,
            yfcc,
            out,
            r["pooling"],
            int(r["resolution"]),
            start_tar,
            total_tars,
            r["has_text"],
            settings,
        )
        print(f"\n#### {r['label']} ({r['framework']} {r['model']}) -> {out}", flush=True)
        if run_configs(cfgs):
            failed.append(r["label"])
    print(
        f"\nsweep: {len(rows) - len(failed)} of {len(rows)} model(s) done"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        flush=True,
    )
    return 1 if failed else 0
