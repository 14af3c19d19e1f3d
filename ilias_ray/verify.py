"""`ilias-ray verify --hdf5_dir DIR`: check every output file, print a table, fail on any problem.

Checks per file: marked complete, datasets present, row counts agree, IDs unique (IDs the input
itself repeats, recorded in `duplicate_index`, are warnings), no NaN/inf, unit-norm vectors,
settings recorded; warnings for a unit (shard) that ended early and for a file with 0 rows.
Across files: distractor chunk numbers have no gaps in the recorded shard range, and no run was
left unfinished (`.partial` files, `.parts` folders). `--strict` makes warnings fail too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from ilias_ray.config import UserError
from ilias_ray.storage import Location

READ_ROWS = 8192  # rows read at a time: memory does not grow with the file
CHUNK_NAME = re.compile(r"^(?P<base>.+_distractors)_(?P<n>\d{5})\.hdf5$")


@dataclass
class Report:
    name: str
    rows: int = 0
    skipped: int = 0
    dim: int = 0
    dtype: str = ""
    problems: list = field(default_factory=list)
    warnings: list = field(default_factory=list)
    run: dict = field(default_factory=dict)


def _strings(ds) -> list:
    return list(ds.asstr()[()]) if ds.shape and ds.shape[0] else []


def norm_tolerance(dtype) -> float:
    # A float16 vector's norm is off by up to ~sqrt(dim) * 2^-11 relative: 0.01 covers dim <= 4096.
    return 1e-2 if np.dtype(dtype).itemsize <= 2 else 1e-4


def check_features(f, rep: Report, local: bool) -> None:
    feats = f["features"]
    n = feats.shape[0]
    if local:
        if "offsets" not in f:
            rep.problems.append("local features without an 'offsets' dataset")
            return
        off = f["offsets"][()]
        if len(off) != rep.rows + 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != n:
            rep.problems.append(f"'offsets' ({len(off)} entries, last {off[-1] if len(off) else '-'}) do not "
                                f"match {rep.rows} rows and {n} vectors")
    elif n != rep.rows:
        rep.problems.append(f"'features' has {n} rows but 'index' has {rep.rows}")
    if n == 0 or feats.ndim != 2 or feats.shape[1] == 0:
        return
    tol = norm_tolerance(feats.dtype)
    bad_values = bad_norms = 0
    for a in range(0, n, READ_ROWS):
        x = feats[a : a + READ_ROWS].astype(np.float32)
        finite = np.isfinite(x).all(axis=1)
        bad_values += int((~finite).sum())
        norms = np.linalg.norm(x[finite], axis=1)
        bad_norms += int((np.abs(norms - 1) > tol).sum())
    if bad_values:
        rep.problems.append(f"{bad_values} vector(s) with NaN or inf")
    if bad_norms:
        rep.problems.append(f"{bad_norms} vector(s) whose L2 norm is not 1 (tolerance {tol})")


def check_file(loc: Location) -> Report:
    rep = Report(loc.name)
    try:
        with loc.open_hdf5() as f:
            check_open_file(f, rep)
    except OSError as e:
        rep.problems.append(f"not a readable HDF5 file ({e})")
    return rep


def check_open_file(f, rep: Report) -> None:
    """The per-file checks on an open HDF5 file."""
    missing = [d for d in ("index", "features") if d not in f]
    if missing:
        rep.problems.append(f"missing dataset(s): {', '.join(missing)}")
        return
    if not bool(f.attrs.get("complete", False)):
        rep.problems.append("not marked complete")
    settings = {}
    if "ilias_ray_settings" in f.attrs:
        settings = json.loads(f.attrs["ilias_ray_settings"])
        rep.run = json.loads(f.attrs.get("run", "{}"))
    else:
        rep.problems.append("settings not recorded (no 'ilias_ray_settings' attribute)")
    ids = _strings(f["index"])
    rep.rows = len(ids)
    rep.dtype = str(f["features"].dtype)
    rep.dim = int(f["features"].shape[1]) if f["features"].ndim == 2 else 0
    if "num_rows" in f.attrs and int(f.attrs["num_rows"]) != rep.rows:
        rep.problems.append(f"'num_rows' says {int(f.attrs['num_rows'])} but 'index' has {rep.rows}")
    if "skipped_index" in f:
        rep.skipped = f["skipped_index"].shape[0]
        if "skipped_reason" not in f or f["skipped_reason"].shape[0] != rep.skipped:
            rep.problems.append("'skipped_index' and 'skipped_reason' differ in length")
    elif settings:
        rep.problems.append("missing dataset: skipped_index")
    values, counts = np.unique(np.array(ids, dtype=object), return_counts=True) if ids else ([], [])
    repeated = {str(v) for v, c in zip(values, counts) if c > 1}
    expected = set(_strings(f["duplicate_index"])) if "duplicate_index" in f else set()
    if repeated - expected:
        some = sorted(repeated - expected)
        rep.problems.append(f"{len(some)} repeated ID(s), e.g. {', '.join(some[:3])}")
    if repeated & expected:
        rep.warnings.append(f"{len(repeated & expected)} ID(s) repeated as in the input itself "
                            f"(see 'duplicate_index')")
    check_features(f, rep, local=settings.get("pooling") == "local")
    for unit in json.loads(f.attrs.get("units", "[]")):
        if unit.get("end", "eof") != "eof":
            rep.warnings.append(f"unit {unit.get('name')} ended early ({unit['end']}): "
                                "its rows before the break are kept")
    if rep.rows == 0:
        rep.warnings.append("0 rows")


def chunk_gaps(reports: list, dataset_tars=None) -> list:
    """Missing distractor chunk files: the recorded shard ranges must be covered without gaps."""
    problems = []
    groups = {}
    for r in reports:
        m = CHUNK_NAME.match(r.name)
        if m:
            groups.setdefault(m["base"], []).append((int(m["n"]), r.run))
    for base, chunks in sorted(groups.items()):
        have = {n for n, _ in chunks}
        want = set(range(min(have), max(have) + 1))
        for _, run in chunks:
            b, start, total = run.get("tar_batch_size"), run.get("start_tar"), run.get("total_tars")
            if total is None and dataset_tars is not None:
                total = dataset_tars(run.get("dataset_dir")) - (start or 0)
            if b and start is not None and total:
                want |= set(range(start // b, (start + total - 1) // b + 1))
        gaps = sorted(want - have)
        if gaps:
            names = ", ".join(f"{base}_{n:05d}.hdf5" for n in gaps[:5])
            problems.append(f"{len(gaps)} distractor chunk file(s) missing: {names}")
    return problems


def count_tars(dataset_dir):
    """Shards in the run's recorded --dataset_dir, or None where it cannot be listed from here."""
    if not dataset_dir:
        return None
    try:
        return sum(1 for n, info in Location.of(dataset_dir).list()
                   if n.endswith(".tar") and info.type == pafs.FileType.File)
    except UserError:
        return None


def verify(hdf5_dir: str, out=print, strict: bool = False) -> int:
    """Print the table; return the exit status (0: no problem, 1: problems, or warnings if strict)."""
    where = Location.of(hdf5_dir)
    where.check_dir("--hdf5_dir")
    listing = sorted(where.list())
    files = [n for n, info in listing if n.endswith(".hdf5") and info.type == pafs.FileType.File]
    unfinished = [n for n, _ in listing if n.endswith((".hdf5.partial", ".hdf5.parts"))]
    if not files and not unfinished:
        raise UserError(f"no .hdf5 files in {where}")
    reports = [check_file(where / n) for n in files]
    general = [f"unfinished run: {n} (rerun the same command to complete it)" for n in unfinished]
    general += chunk_gaps(reports, count_tars)

    header = ("file", "rows", "skipped", "dim", "dtype", "status")
    table = [(r.name, str(r.rows), str(r.skipped), str(r.dim), r.dtype,
              "ok" if not r.problems else f"{len(r.problems)} problem(s)") for r in reports]
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    out("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in table:
        out("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    for r in reports:
        for p in r.problems:
            out(f"problem: {r.name}: {p}")
        for w in r.warnings:
            out(f"warning: {r.name}: {w}")
    for p in general:
        out(f"problem: {p}")
    n_problems = sum(len(r.problems) for r in reports) + len(general)
    n_warnings = sum(len(r.warnings) for r in reports)
    out(f"verify: {len(reports)} file(s), {n_problems} problem(s), {n_warnings} warning(s)"
        + (" (--strict: warnings fail)" if strict and n_warnings and not n_problems else ""))
    return 1 if n_problems or (strict and n_warnings) else 0
