"""The inputs of a partition, listed on the driver: folder files (with their boxes), tar shards
and their sizes, and --selected_ids. A file that cannot be read fails here, in one line."""

from __future__ import annotations

import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from fnmatch import fnmatchcase

import pyarrow.fs as pafs

from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.plan_types import escape_id
from ilias_ray.storage.location import Location, iter_lines

IMAGE_EXTS = {"jpg", "jpeg", "png", "JPG", "JPEG", "PNG"}
LISTING_THREADS = 16  # concurrent small reads (box files) from a bucket


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
    file_types = (pafs.FileType.File, pafs.FileType.Unknown)
    return {
        rel: info.size if info.type == pafs.FileType.File else None
        for rel, info in root.list(recursive=recursive)
        if info.type in file_types
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
        fields = ln.replace(",", " ").split()
        try:
            vals = [float(v) for v in fields]
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


def folder_items(cfg: Config) -> list:
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


def tar_chunks(cfg: Config) -> tuple:
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
