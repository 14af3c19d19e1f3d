"""The job: plan -> read -> decode -> embed -> sink, as one streaming Ray Data dataset.

The driver only plans and prints progress: image bytes are decoded in the task that reads them,
pixels go to the model actors, and only features reach the sink actor.
"""

from __future__ import annotations

import os
import time

from ilias_ray.config import Config
from ilias_ray.errors import UserError, causes, one_line
from ilias_ray.job.dataset import build_dataset, sink_stage
from ilias_ray.job.progress import Progress, say
from ilias_ray.job.session import init_ray
from ilias_ray.job.sizing import MODEL_BATCH_RETRIES, sink_count
from ilias_ray.models import registry
from ilias_ray.output.assemble import assemble
from ilias_ray.output.lock import OutputLocks
from ilias_ray.plan.outdir import check_output_dir, drop_stale
from ilias_ray.plan.planner import make_plan
from ilias_ray.plan_types import Plan
from ilias_ray.storage.location import Location
from ilias_ray.testing import faults


def run(cfg: Config) -> dict:
    """Run one extraction; returns the summary dict (also printed)."""
    t0 = time.time()
    cfg.validate()
    notice = faults.check()
    if notice:
        say(notice)
    registry.check(cfg.framework, cfg.model, pooling=cfg.pooling, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
    plan = make_plan(cfg)
    for name in plan.done:
        say(f"[{name}] already complete with the same settings: skipped")
    for note in plan.notes:
        say(note)
    summary = {"written": [], "already_done": plan.done, "rows": 0, "skipped": 0}
    if plan.outputs:
        check_output_dir(cfg)
        with OutputLocks(Location.of(cfg.hdf5_dir), [o.name for o in plan.outputs]) as locks:
            drop_stale(cfg, plan)
            for o in plan.outputs:
                done = sum(u.record is not None for u in o.units)
                if done:
                    say(f"[{o.name}] resuming: {done} of {len(o.units)} unit(s) already done by an earlier run")
            summary.update(execute(cfg, plan, locks))
    summary["wall_s"] = round(time.time() - t0, 2)
    summary["images_per_s"] = round((summary["rows"] + summary["skipped"]) / max(summary["wall_s"], 1e-6), 2)
    say(
        f"summary: {len(summary['written'])} file(s) written, {len(plan.done)} already complete, "
        f"{summary['rows']} rows, {summary['skipped']} skipped, {summary['wall_s']:.1f} s, "
        f"{summary['images_per_s']:.1f} img/s"
    )
    for name in summary["written"]:
        say(f"  {Location.of(cfg.hdf5_dir) / name}")
    if summary.get("truncated_shards"):
        say(
            f"  {summary['truncated_shards']} shard(s) ended early (truncated, or not a tar): the rows before "
            "the break are kept; each file's 'units' attribute says which"
        )
    if summary.get("read_retries"):
        say(
            f"  {summary['read_retries']} read(s) of shards failed part-way and were retried (dropped connections, "
            "throttling); every row is still written once"
        )
    if summary.get("repeated_ids"):
        say(
            f"  {summary['repeated_ids']} ID(s) occur more than once in the input: every occurrence has its "
            "row; they are listed in the file's 'duplicate_index'"
        )
    return summary


def actor_death(e: BaseException):
    """The one-line UserError for a run stopped by a dead actor, or None for other failures."""
    from ray.exceptions import RayActorError

    from ilias_ray.stages.embed import batch_in_flight

    dead = next((c for c in causes(e) if isinstance(c, RayActorError)), None)
    if dead is None:
        return None
    kept = "finished shards are kept: rerun the same command to resume"
    batch = batch_in_flight(dead.actor_id) if getattr(dead, "actor_id", None) else None
    if batch:
        return UserError(
            f"a model batch ({batch}) killed its actor {1 + MODEL_BATCH_RETRIES} times, so the run "
            f"stopped; an image the model cannot take, or an out-of-memory kill, does this; {kept}"
        )
    return UserError(f"an actor died: {one_line(dead)[:200]}; {kept}")  # sinks: sink.route


def execute(cfg: Config, plan: Plan, locks: OutputLocks) -> dict:
    from ilias_ray.job.sizing import cap_notice
    from ilias_ray.stages.sink import progress_batch, progress_row

    progress = Progress(plan)
    # Outputs whose units an earlier run all finished (it stopped while assembling) need no Ray:
    # the commit step runs here.
    for output in plan.outputs:
        if output.done:
            records = {k: u.record for k, u in enumerate(output.units)}
            assemble(output, plan.format, records)
            progress.update(progress_batch([progress_row(output.index, records.values())]))
    if not all(output.done for output in plan.outputs):
        ray = init_ray(cfg)
        ds, pool = build_dataset(cfg, plan, ray)
        ds, sinks = sink_stage(ray, ds, plan, sink_count(cfg, pool, len(plan.outputs)))
        say(
            f"extracting {len(plan.outputs)} file(s) with {cfg.framework}:{cfg.model} "
            f"({pool.min_actors} to {pool.max_actors} model actor(s), {'GPU' if pool.gpu else 'CPU'}; "
            f"{len(sinks)} sink(s))"
        )
        cap = cap_notice(cfg.model_actors, pool.gpu, pool.max_actors)
        if cap:
            say(cap)
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                progress.update(batch)  # the driver sees progress rows only
                locks.check()
        except Exception as e:
            raise actor_death(e) or e
        finally:
            for sink in sinks:  # done, or the run stops: they hold nothing a rerun needs
                ray.kill(sink)
        if os.environ.get("ILIAS_RAY_STATS"):
            say(ds.stats())
    tot = progress.totals()
    missing = [o.name for o in plan.outputs if o.name not in tot["finished"]]
    if missing:
        raise RuntimeError(f"the job ended but these outputs are incomplete: {', '.join(missing)}")
    return {
        "written": tot["finished"],
        "rows": tot["rows"],
        "skipped": tot["skipped"],
        "truncated_shards": tot["truncated_shards"],
        "repeated_ids": tot["repeated_ids"],
        "read_retries": tot["read_retries"],
        "timeline": progress.timeline,
    }
