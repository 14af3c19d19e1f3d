"""Which outputs to write, from which inputs, and which of them are already done.

Everything here runs on the driver before Ray starts, so user errors surface as one line
and no image bytes are touched. Inputs are split into *units* (one tar shard, or one list of
folder files); every row of a unit gets a position, and `seq = unit << 32 | position` sorts
exactly like the required output order.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ilias_ray.config import Config, UserError, settings_json

IMAGE_EXTS = {"jpg", "jpeg", "png", "JPG", "JPEG", "PNG"}
PARTIAL_SUFFIX = ".partial"


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
    path: Optional[str] = None  # tar path
    size: int = 0  # tar size in bytes (for progress)
    items: list = field(default_factory=list)  # folder/text: [(id, path, boxes)]
    record: Optional[dict] = None  # the completion record of an earlier, interrupted run

    @property
    def count(self) -> Optional[int]:
        """Rows this unit owes its output, when known before reading (not for tars)."""
        return None if self.kind == "tar" else len(self.items)


@dataclass
class Output:
    index: int
    name: str
    path: str
    units: list  # uids, in output order
    settings: dict

    @property
    def partial_path(self) -> str:
        return self.path + PARTIAL_SUFFIX


@dataclass
class Plan:
    outputs: list  # outputs to write now
    units: list  # all units of those outputs, by uid (those with a record are not read again)
    done: list  # names of outputs that are already complete with the same settings
    selected_keys: Optional[frozenset] = None  # distractor key filter


def read_selected_ids(path: str) -> list:
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                ids.append(line.split(",")[0].strip())
    if not ids:
        raise UserError(f"--selected_ids {path!r} lists no IDs")
    return ids


def list_images(root: Path) -> list:
    """Relative paths (str) of image files under root, sorted as Python sorts strings."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if "." in f and f.rsplit(".", 1)[1] in IMAGE_EXTS:
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def box_path(image_path: str) -> str:
    base = image_path.rsplit(".", 1)[0] if "." in os.path.basename(image_path) else image_path
    return base + "_bbox.txt"


def read_boxes(image_path: str) -> list:
    """Boxes `[x, y, w, h]` from the image's `_bbox.txt`; a clear error if missing or malformed."""
    bp = box_path(image_path)
    try:
        with open(bp, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError as e:
        raise UserError(f"box file {bp}: {e.strerror or e}") from None
    boxes = []
    for ln in lines:
        parts = ln.replace(",", " ").split()
        try:
            vals = [float(v) for v in parts]
        except ValueError:
            vals = []
        if len(vals) != 4 or vals[2] < 0 or vals[3] < 0:
            raise UserError(f"box file {bp}: malformed line {ln!r} (want 'x y w h')")
        boxes.append([int(v) if v.is_integer() else v for v in vals])
    if not boxes:
        raise UserError(f"box file {bp}: no boxes")
    return boxes


def _folder_items(cfg: Config) -> list:
    root = Path(cfg.dataset_dir)
    if cfg.partition == "text_queries":
        if cfg.selected_ids:
            rel = read_selected_ids(cfg.selected_ids)
        else:
            rel = sorted(str(p.relative_to(root)) for p in root.rglob("T*.txt") if p.is_file())
    elif cfg.selected_ids:
        rel = read_selected_ids(cfg.selected_ids)
    else:
        # Match on the path relative to the dataset root (the reference tests the absolute path).
        key = "quer" if cfg.partition == "image_queries" else "pos"
        rel = [p for p in list_images(root) if key in p]
    if not rel:
        raise UserError(f"no inputs for --partition {cfg.partition} under {cfg.dataset_dir}")
    missing = [r for r in rel if not (root / r).is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        msg = f"{len(missing)} listed file(s) not found under {cfg.dataset_dir}: {', '.join(missing[:3])}{more}"
        if not cfg.skip_missing:
            raise UserError(msg + "; pass --skip_missing true to record them as skipped and go on")
        print(f"ilias-ray: {msg}; they are recorded as skipped (--skip_missing true)", flush=True)
    need_boxes = cfg.partition != "text_queries" and (cfg.masking or cfg.crop_resize)
    absent = set(missing)
    items = []
    for r in rel:
        path = str(root / r)
        boxes = json.dumps(read_boxes(path)) if need_boxes and r not in absent else ""
        items.append((escape_id(r), path, boxes))
    return items


def _tar_chunks(cfg: Config) -> list:
    root = Path(cfg.dataset_dir)
    shards = sorted(p.name for p in root.glob("*.tar"))
    if not shards:
        raise UserError(f"no .tar shards in {cfg.dataset_dir}")
    total = cfg.total_tars if cfg.total_tars is not None else len(shards)
    sel = shards[cfg.start_tar : cfg.start_tar + total]
    if not sel:
        raise UserError(f"--start_tar {cfg.start_tar} is past the last of {len(shards)} shards")
    b = cfg.tar_batch_size
    return [(i + cfg.start_tar // b, sel[i * b : (i + 1) * b]) for i in range((len(sel) + b - 1) // b)]


def output_status(path: str, settings: dict) -> str:
    """'missing', 'same' or a one-line description of how an existing output differs."""
    if not os.path.exists(path):
        return "missing"
    import h5py  # here: read tasks import this module and never need h5py

    try:
        with h5py.File(path, "r") as f:
            recorded = f.attrs.get("ilias_ray_settings")
            complete = bool(f.attrs.get("complete", False))
    except OSError:
        return "it is not a readable HDF5 file"
    if recorded is None or not complete:
        return "it records no ilias-ray settings (made by another tool?)"
    old = json.loads(recorded)
    diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
    return "same" if not diff else "settings differ (" + "; ".join(diff) + ")"


def finished_units(path: str, settings: dict) -> dict:
    """Completion records {unit index: record} an interrupted run of the same settings left."""
    folder = path + ".parts"
    try:
        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return {}
    if meta.get("fingerprint") != fingerprint(settings):
        return {}
    records = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext == ".json" and stem.isdigit():
            try:
                with open(os.path.join(folder, name)) as f:
                    records[int(stem)] = json.load(f)
            except (OSError, ValueError):
                pass  # a torn record: redo that unit
    return records


def make_plan(cfg: Config) -> Plan:
    """List inputs, name outputs, and decide per output: skip, refuse, or (re)do."""
    base = cfg.output_settings()
    if cfg.partition == "distractors":
        selected = frozenset(read_selected_ids(cfg.selected_ids)) if cfg.selected_ids else None
        groups = []
        for file_id, shards in _tar_chunks(cfg):
            name = f"{cfg.hdf5_name}_distractors_{file_id:05d}.hdf5"
            groups.append((name, [("tar", s) for s in shards], dict(base, shards=shards)))
    else:
        selected = None
        items = _folder_items(cfg)
        kind = "text" if cfg.partition == "text_queries" else "folder"
        name = f"{cfg.hdf5_name}_{cfg.partition}.hdf5"
        groups = [(name, [(kind, items)], dict(base, rows=len(items)))]

    outputs, units, done = [], [], []
    for name, sources, settings in groups:
        path = os.path.join(cfg.hdf5_dir, name)
        status = output_status(path, settings)
        if status == "same" and not cfg.overwrite:
            done.append(name)
            continue
        if status not in ("missing", "same") and not cfg.overwrite:
            raise UserError(f"{path} exists but {status}; pass --overwrite true to replace it")
        out = Output(index=len(outputs), name=name, path=path, units=[], settings=settings)
        records = {} if cfg.overwrite else finished_units(path, settings)
        for k, (kind, src) in enumerate(sources):
            uid = len(units)
            if kind == "tar":
                tar_path = os.path.join(cfg.dataset_dir, src)
                unit = Unit(uid, out.index, "tar", src, path=tar_path, size=os.path.getsize(tar_path))
            else:
                unit = Unit(uid, out.index, kind, cfg.partition, items=src)
            unit.record = records.get(k)
            units.append(unit)
            out.units.append(uid)
        outputs.append(out)
    return Plan(outputs=outputs, units=units, done=done, selected_keys=selected)


MIN_FREE_BYTES = 64 << 20  # below this a run would fail on its first part files


def prepare_output_dir(cfg: Config, plan: Plan) -> None:
    """Create --hdf5_dir and drop stale partial files of the outputs we are about to redo."""
    try:
        os.makedirs(cfg.hdf5_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--hdf5_dir {cfg.hdf5_dir!r}: {e.strerror or e}") from None
    if not os.access(cfg.hdf5_dir, os.W_OK):
        raise UserError(f"--hdf5_dir {cfg.hdf5_dir!r} is not writable")
    free = shutil.disk_usage(cfg.hdf5_dir).free
    if free < MIN_FREE_BYTES:
        raise UserError(f"--hdf5_dir {cfg.hdf5_dir!r} has only {free >> 20} MiB free (need at least "
                        f"{MIN_FREE_BYTES >> 20} MiB to start); make room and rerun")
    units = {u.uid: u for u in plan.units}
    for out in plan.outputs:
        if os.path.exists(out.partial_path):
            os.remove(out.partial_path)
        done = [units[uid] for uid in out.units if units[uid].record is not None]
        if not done and os.path.isdir(out.path + ".parts"):
            shutil.rmtree(out.path + ".parts")  # other settings, --overwrite, or nothing finished


def fingerprint(settings: dict) -> str:
    import hashlib

    return hashlib.sha256(settings_json(settings).encode()).hexdigest()
