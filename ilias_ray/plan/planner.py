"""Which outputs to write, from which inputs, and which of them are already done.

Everything here runs on the driver before Ray starts, so user errors surface as one line
and no image bytes are touched. Inputs are split into *units* (one tar shard, or one list of
folder files); every row of a unit gets a position, and `seq = unit << 32 | position` sorts
exactly like the required output order.
"""

from __future__ import annotations

from dataclasses import dataclass

from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.output.parts import finished_units
from ilias_ray.output.schema import SUFFIX, library_versions, output_status, parts_location
from ilias_ray.plan.inputs import folder_items, read_selected_ids, tar_chunks
from ilias_ray.plan_types import KeySet, Output, OutputFormat, Plan, Source, Unit
from ilias_ray.storage.credentials import redact
from ilias_ray.storage.location import Location


def versions_note(recorded: dict) -> str:
    """'' when `recorded` are this run's library versions, else what differs, in a few words."""
    now = library_versions()
    diff = [f"{k} {recorded.get(k, '?')} (now {v})" for k, v in now.items() if recorded.get(k) != v]
    return f"made with {', '.join(diff)}" if diff else ""


@dataclass
class Group:
    """One output file to plan: its name, its sources, its settings, and the one-partition run
    (Config.partition_runs) it belongs to."""

    name: str
    source: Source  # where its units' rows come from
    sources: list  # one per unit: (shard name, size) for tars, the tuple of items for folder/text
    settings: dict
    run: Config


def partition_groups(run: Config) -> tuple:
    """([Group], distractor KeySet or None) of one partition's outputs."""
    base = run.output_settings()
    if run.partition == "distractors":
        selected = KeySet(read_selected_ids(run.selected_ids)) if run.selected_ids else None
        chunks, sizes = tar_chunks(run)
        groups = []
        for file_id, shards in chunks:
            name = f"{run.hdf5_name}_distractors_{file_id:05d}{SUFFIX}"
            # A shard replaced by another of the same name must not pass for the one that was read.
            settings = dict(base, shards=shards, shard_sizes=[sizes[s] for s in shards])
            groups.append(Group(name, Source.TAR, [(s, sizes[s]) for s in shards], settings, run))
        return groups, selected
    items = tuple(folder_items(run))
    source = Source.TEXT if run.partition == "text_queries" else Source.FOLDER
    name = f"{run.hdf5_name}_{run.partition}{SUFFIX}"
    return [Group(name, source, [items], dict(base, rows=len(items)), run)], None


def recorded_run(run: Config) -> dict:
    """What an output records of the run that made it (its `run` attribute): credentials redacted."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in run.run_settings().items()}


def make_plan(cfg: Config) -> Plan:
    """List inputs, name outputs, and decide per output: skip, refuse, or (re)do. Several
    partitions (Config.partition_runs) make one plan: their outputs share the run's units and
    sinks. An output whose units an earlier run all finished is planned `done`: the driver
    assembles it."""
    groups, selected = [], None
    for run in cfg.partition_runs():
        more, keys = partition_groups(run)
        groups += more
        selected = keys if keys is not None else selected

    out_dir = Location.of(cfg.hdf5_dir)
    outputs, done, notes = [], [], []
    uid = 0
    for g in groups:
        status, versions = output_status(out_dir / g.name, g.settings)
        if status == "same" and not cfg.overwrite:
            done.append(g.name)
            other = versions_note(versions)
            if other:
                notes.append(
                    f"[{g.name}] {other}: its numbers may differ slightly from this run's; "
                    "pass --overwrite true to recompute it"
                )
            continue
        if status not in ("missing", "same") and not cfg.overwrite:
            raise UserError(f"{out_dir / g.name} exists but {status}; pass --overwrite true to replace it")
        index = len(outputs)
        records = {} if cfg.overwrite else finished_units(parts_location(out_dir, g.name), g.settings)
        root = Location.of(g.run.dataset_dir)
        units = []
        for k, source in enumerate(g.sources):
            if g.source == Source.TAR:
                shard, size = source
                unit = Unit(uid, index, Source.TAR, shard, src=root / shard, size=size, record=records.get(k))
            else:
                unit = Unit(uid, index, g.source, g.run.partition, src=root, items=source, record=records.get(k))
            units.append(unit)
            uid += 1
        outputs.append(
            Output(
                index=index,
                name=g.name,
                dir=out_dir,
                units=tuple(units),
                settings=g.settings,
                run_settings=recorded_run(g.run),
                done=all(u.record is not None for u in units),
            )
        )
    fmt = OutputFormat(
        dtype="float16" if cfg.store_fp16 else "float32",
        compression=cfg.hdf5_compression,
        per_token=cfg.pooling == "local",
    )
    plan = Plan(outputs=outputs, format=fmt, done=done, selected_keys=selected, notes=notes)
    probe_inputs(plan)
    return plan


def probe_inputs(plan: Plan) -> None:
    """Read the first byte of the first shard and of the first folder file still to read: a
    denied or failing read is one line now, before any Ray work, not an error deep in a read task."""
    probed = set()
    for u in plan.units:
        tar = u.source == Source.TAR
        if u.record is None and tar not in probed:
            probed.add(tar)
            first = u.src if tar else next((u.src / p for _, p, _ in u.items if p), None)
            if first is not None:
                first.probe()
