"""Which outputs to write, from which inputs, and which of them are already done.

Everything here runs on the driver before Ray starts, so user errors surface as one line
and no image bytes are touched. Inputs are split into *units* (one tar shard, or one list of
folder files); every row of a unit gets a position, and `seq = unit << 32 | position` sorts
exactly like the required output order.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Optional

import numpy as np
import pyarrow.fs as pafs

from ilias_ray.config import Config, UserError
from ilias_ray.hdf5_out import SUFFIX, output_status, partial_path
from ilias_ray.parts import PartsStore, finished_units, parts_location
from ilias_ray.storage import Location, iter_lines

IMAGE_EXTS = {"jpg", "jpeg", "png", "JPG", "JPEG", "PNG"}
LISTING_THREADS = 16  # concurrent small reads (box files) from a bucket


def escape_id(path: str) -> str:
    """ASCII-escape an ID the way the ILIAS reference does (identity for ASCII)."""
    return str(path.encode("unicode-escape")).replace("\\\\u", "#U").replace("\\\\x", "#U00")[2:-1]


def seq_id(unit: int, pos: int) -> int:
    return (unit << 32) | pos


@dataclass
class Unit:
    uid: int
    out: int
    kind: str  # "tar" | "folder" | "text"
    name: str  # shard file name, or the partition for folder units
    src: Optional[Location] = None  # the tar shard, or the dataset folder of folder/text items
    size: int = 0  # tar size in bytes (for progress)
    items: list = field(default_factory=list)  # folder/text: [(id, path below src or None if missing, boxes)]
    record: Optional[dict] = None  # the completion record of an earlier, interrupted run

    @property
    def count(self) -> Optional[int]:
        """Rows this unit owes its output, when known before reading (not for tars)."""
        return None if self.kind == "tar" else len(self.items)


@dataclass
class Output:
    index: int
    name: str
    dir: Location  # --hdf5_dir
    units: list  # uids, in output order
    settings: dict
    run: dict = field(default_factory=dict)  # where and how it was made (Config.run_settings of its partition)

    @property
    def loc(self) -> Location:
        return self.dir / self.name

    @property
    def parts(self) -> Location:
        return parts_location(self.dir, self.name)


@dataclass
class Plan:
    outputs: list  # outputs to write now
    units: list  # all units of those outputs, by uid (those with a record are not read again)
    done: list  # names of outputs that are already complete with the same settings
    selected_keys: Optional["KeySet"] = None  # distractor key filter
    notes: list = field(default_factory=list)  # one line each, for the user, about skipped outputs


class KeySet:
    """The --selected_ids of a distractor run, as one sorted array of UTF-8 keys (numpy 'S' dtype).

    Exact membership by binary search. Unlike a set of str, it is one buffer: the driver puts it
    in Ray's object store once, and every read task maps it without copying, so a task's size and
    start-up cost do not grow with the list (mini-ILIAS lists 5M IDs, for 1,000 shards)."""

    def __init__(self, ids):
        encoded = [i.encode("utf-8") for i in ids]
        self.keys = np.unique(np.array(encoded, dtype=f"S{max(map(len, encoded), default=1)}"))

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: str) -> bool:
        b = key.encode("utf-8")
        if len(b) > self.keys.dtype.itemsize or not b or b.endswith(b"\0"):
            return False  # longer than every listed key ('S' would truncate it), or not storable
        i = int(np.searchsorted(self.keys, b))
        return i < len(self.keys) and bool(self.keys[i] == b)


def read_selected_ids(where: str) -> list:
    ids = [ln.strip().split(",")[0].strip() for ln in iter_lines(Location.of(where)) if ln.strip()]
    if not ids:
        raise UserError(f"--selected_ids {Location.of(where)} lists no IDs")
    return ids


def check_below(ids: list, where: str) -> None:
    """Listed files are paths below --dataset_dir: an absolute path or a '..' would read outside."""
    bad = [i for i in ids if i.startswith(("/", "\\")) or ".." in i.replace("\\", "/").split("/")]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(
            f"--selected_ids {Location.of(where)}: {bad[0]!r}{more} is not a path below --dataset_dir "
            "(no absolute paths, no '..')"
        )


def list_files(root: Location, recursive: bool = True) -> dict:
    """{path below root: size} of every file under root; None for an entry that is there but
    cannot be read (a broken link): using it is an error, never a smaller dataset."""
    kinds = (pafs.FileType.File, pafs.FileType.Unknown)
    return {
        rel: info.size if info.type == pafs.FileType.File else None
        for rel, info in root.list(recursive=recursive)
        if info.type in kinds
    }


def check_readable(root: Location, names: list, files: dict) -> None:
    broken = [n for n in names if files.get(n, 0) is None]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise UserError(f"cannot read {root / broken[0]}: not found (a broken link?){more}")


def list_images(files) -> list:
    """Paths (str, '/'-separated) of image files among `files`, sorted as Python sorts strings."""
    return sorted(f for f in files if "." in posixpath.basename(f) and f.rsplit(".", 1)[1] in IMAGE_EXTS)


def box_path(image_path: str) -> str:
    base = image_path.rsplit(".", 1)[0] if "." in posixpath.basename(image_path) else image_path
    return base + "_bbox.txt"


def parse_boxes(text: str, where) -> list:
    """Boxes `[x, y, w, h]` from a `_bbox.txt` file's text; a clear error if malformed."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    boxes = []
    for ln in lines:
        parts = ln.replace(",", " ").split()
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != 4 or vals[2] < 0 or vals[3] < 0:
            raise UserError(f"box file {where}: malformed line {ln!r} (want 'x y w h')")
        boxes.append([int(v) if v.is_integer() else v for v in vals])
    if not boxes:
        raise UserError(f"box file {where}: no boxes")
    return boxes


def read_boxes(root: Location, image: str, files: dict) -> list:
    """The boxes of `image` (a path below root), from its `_bbox.txt` beside it."""
    bp = root / box_path(image)
    if box_path(image) not in files:
        raise UserError(f"box file {bp}: No such file or directory")
    try:
        text = bp.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"box file {bp}: not UTF-8 text") from None
    return parse_boxes(text, bp)


def _folder_items(cfg: Config) -> list:
    root = Location.of(cfg.dataset_dir)
    files = list_files(root)
    if cfg.selected_ids:
        rel = read_selected_ids(cfg.selected_ids)
        check_below(rel, cfg.selected_ids)
    elif cfg.partition == "text_queries":
        rel = sorted(f for f in files if fnmatchcase(posixpath.basename(f), "T*.txt"))
    else:
        # Match on the path relative to the dataset root (the reference tests the absolute path).
        key = "quer" if cfg.partition == "image_queries" else "pos"
        rel = [p for p in list_images(files) if key in p]
    if not rel:
        raise UserError(f"no inputs for --partition {cfg.partition} under {root}")
    found = {r: r if r in files else posixpath.normpath(r) for r in rel}  # './a.jpg' names 'a.jpg'
    missing = [r for r in rel if found[r] not in files]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        msg = f"{len(missing)} listed file(s) not found under {root}: {', '.join(missing[:3])}{more}"
        if not cfg.skip_missing:
            raise UserError(msg + "; pass --skip_missing true to record them as skipped and go on")
        print(f"ilias-ray: {msg}; they are recorded as skipped (--skip_missing true)", flush=True)
    absent = set(missing)
    present = [found[r] for r in rel if r not in absent]
    check_readable(root, present, files)
    boxes = {}
    if cfg.partition != "text_queries" and (cfg.masking or cfg.crop_resize):
        with ThreadPoolExecutor(LISTING_THREADS) as pool:  # many small reads when in a bucket
            boxes = dict(zip(present, pool.map(lambda p: json.dumps(read_boxes(root, p, files)), present)))
    return [(escape_id(r), None if r in absent else found[r], boxes.get(found[r], "")) for r in rel]


def _tar_chunks(cfg: Config) -> tuple:
    """([(file id, [shard names])], {shard name: size}) of the shards this run covers."""
    root = Location.of(cfg.dataset_dir)
    sizes = {rel: size for rel, size in list_files(root, recursive=False).items() if rel.endswith(".tar")}
    shards = sorted(sizes)
    if not shards:
        raise UserError(f"no .tar shards in {root}")
    total = cfg.total_tars if cfg.total_tars is not None else len(shards)
    sel = shards[cfg.start_tar : cfg.start_tar + total]
    if not sel:
        raise UserError(f"--start_tar {cfg.start_tar} is past the last of {len(shards)} shards")
    check_readable(root, sel, sizes)
    b = cfg.tar_batch_size
    return [(i + cfg.start_tar // b, sel[i * b : (i + 1) * b]) for i in range((len(sel) + b - 1) // b)], sizes


def library_versions() -> dict:
    """The versions of what computes the numbers; every output file records them."""
    import importlib.metadata as md

    from ilias_ray import __version__

    out = {"ilias_ray": __version__}
    for pkg in ("torch", "torchvision", "timm", "open_clip_torch", "ray", "h5py", "pillow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def versions_note(recorded: dict) -> str:
    """'' when `recorded` are this run's library versions, else what differs, in a few words."""
    now = library_versions()
    diff = [f"{k} {recorded.get(k, '?')} (now {v})" for k, v in now.items() if recorded.get(k) != v]
    return f"made with {', '.join(diff)}" if diff else ""


@dataclass
class Group:
    """One output file to plan: its name, its sources, its settings, and the one-partition run
    (Config.parts) it belongs to."""

    name: str
    kind: str  # the units' kind: "tar" | "folder" | "text"
    sources: list  # one per unit: (shard name, size) for tars, the list of items for folder/text
    settings: dict
    part: Config


def partition_groups(part: Config) -> tuple:
    """([Group], distractor KeySet or None) of one partition's outputs."""
    base = part.output_settings()
    if part.partition == "distractors":
        selected = KeySet(read_selected_ids(part.selected_ids)) if part.selected_ids else None
        chunks, sizes = _tar_chunks(part)
        groups = []
        for file_id, shards in chunks:
            name = f"{part.hdf5_name}_distractors_{file_id:05d}{SUFFIX}"
            # A shard replaced by another of the same name must not pass for the one that was read.
            settings = dict(base, shards=shards, shard_sizes=[sizes[s] for s in shards])
            groups.append(Group(name, "tar", [(s, sizes[s]) for s in shards], settings, part))
        return groups, selected
    items = _folder_items(part)
    kind = "text" if part.partition == "text_queries" else "folder"
    name = f"{part.hdf5_name}_{part.partition}{SUFFIX}"
    return [Group(name, kind, [items], dict(base, rows=len(items)), part)], None


def make_plan(cfg: Config) -> Plan:
    """List inputs, name outputs, and decide per output: skip, refuse, or (re)do. Several
    partitions (Config.parts) make one plan: their outputs share the run's units and sink."""
    groups, selected = [], None
    for part in cfg.parts():
        more, keys = partition_groups(part)
        groups += more
        selected = keys if keys is not None else selected

    out_dir = Location.of(cfg.hdf5_dir)
    outputs, units, done, notes = [], [], [], []
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
        out = Output(
            index=len(outputs), name=g.name, dir=out_dir, units=[], settings=g.settings, run=g.part.run_settings()
        )
        records = {} if cfg.overwrite else finished_units(out.parts, g.settings)
        root = Location.of(g.part.dataset_dir)
        for k, source in enumerate(g.sources):
            uid = len(units)
            if g.kind == "tar":
                shard, size = source
                unit = Unit(uid, out.index, "tar", shard, src=root / shard, size=size)
            else:
                unit = Unit(uid, out.index, g.kind, g.part.partition, src=root, items=source)
            unit.record = records.get(k)
            units.append(unit)
            out.units.append(uid)
        outputs.append(out)
    plan = Plan(outputs=outputs, units=units, done=done, selected_keys=selected, notes=notes)
    probe_inputs(plan)
    return plan


def probe_inputs(plan: Plan) -> None:
    """Read the first byte of the first shard and of the first folder file still to read: a
    denied or failing read is one line now, before any Ray work, not an error deep in a read task."""
    probed = set()
    for u in plan.units:
        where = "tar" if u.kind == "tar" else "folder"
        if u.record is None and where not in probed:
            probed.add(where)
            first = u.src if u.kind == "tar" else next((u.src / p for _, p, _ in u.items if p), None)
            if first is not None:
                first.probe()


MIN_FREE_BYTES = 64 << 20  # below this a run would fail on its first part files


def check_output_dir(cfg: Config) -> None:
    """Make sure --hdf5_dir (and, for a bucket, the local staging directory) takes writes.

    Files are written in the staging directory (--hdf5_dir itself when local) and published from
    there."""
    out_dir = Location.of(cfg.hdf5_dir)
    staging = out_dir.staging()
    try:
        os.makedirs(staging, exist_ok=True)
    except OSError as e:
        flag = "--hdf5_dir" if out_dir.local else "the staging directory (ILIAS_RAY_STAGING_DIR)"
        raise UserError(f"{flag} {staging!r}: {e.strerror or e}") from None
    if out_dir.local and not os.access(staging, os.W_OK):
        raise UserError(f"--hdf5_dir {cfg.hdf5_dir!r} is not writable")
    if not out_dir.local:
        out_dir.check_writable("--hdf5_dir")
    free = shutil.disk_usage(staging).free
    if free < MIN_FREE_BYTES:
        where = f"--hdf5_dir {cfg.hdf5_dir!r}" if out_dir.local else f"the staging directory {staging!r}"
        raise UserError(
            f"{where} has only {free >> 20} MiB free (need at least "
            f"{MIN_FREE_BYTES >> 20} MiB to start); make room and rerun"
        )


def drop_stale(cfg: Config, plan: Plan) -> None:
    """Drop what earlier runs left of the outputs to redo: partial files, the parts of an output
    none of whose units is kept, and a bucket's earlier staging copies (the bucket is the record).
    Only under the outputs' locks (lock.py): these may be another live run's files otherwise."""
    out_dir = Location.of(cfg.hdf5_dir)
    units = {u.uid: u for u in plan.units}
    for out in plan.outputs:
        partial = partial_path(out_dir, out.name)
        if os.path.exists(partial):
            os.remove(partial)
        PartsStore(out_dir, out.name).drop_staged()
        if not any(units[uid].record is not None for uid in out.units):
            out.parts.delete_dir()  # other settings, --overwrite, or nothing finished
