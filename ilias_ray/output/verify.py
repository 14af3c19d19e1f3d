"""`ilias-ray verify --hdf5_dir DIR`: check every output file, print a table, fail on any problem.

Checks per file: marked complete, the datasets and attributes that output/schema.py declares present
(datasets with their declared types; those an older ilias-ray did not write yet are warnings),
row counts agree, IDs unique (IDs the input itself repeats, recorded in `duplicate_index`, are
warnings), no NaN/inf, unit-norm vectors, settings recorded; warnings for a unit (shard) that
ended early and for a file with 0 rows.
Across files: distractor chunk numbers have no gaps in the recorded shard range, and no run was
left unfinished (`.partial` files, `.parts` folders). `--strict` makes warnings fail too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from ilias_ray.errors import UserError
from ilias_ray.output import schema
from ilias_ray.output.schema import FEATURES, INDEX, OFFSETS, SKIPPED_INDEX, SKIPPED_REASON
from ilias_ray.storage.location import Location

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


def check_features(f, rep: Report, per_token: bool) -> None:
    feats = f[FEATURES.name]
    n = feats.shape[0]
    if per_token:
        if OFFSETS.name not in f:
            return  # check_schema reported it
        off = f[OFFSETS.name][()]
        if len(off) != rep.rows + 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != n:
            rep.problems.append(
                f"'{OFFSETS.name}' ({len(off)} entries, last {off[-1] if len(off) else '-'}) do not "
                f"match {rep.rows} rows and {n} vectors"
            )
    elif n != rep.rows:
        rep.problems.append(f"'{FEATURES.name}' has {n} rows but '{INDEX.name}' has {rep.rows}")
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


def check_schema(f, rep: Report, per_token: bool) -> None:
    """The file against the declared schema (schema.DATASETS, schema.ATTRS): every dataset
    there with its declared type, every attribute there. Only for a file that records ilias-ray
    settings (another tool's file is already one problem)."""
    wanted = [d for d in schema.DATASETS if per_token or not d.per_token]
    missing = [d for d in wanted if d.name not in f]
    report_missing(rep, "dataset(s)", [d.name for d in missing], {d.name for d in missing if d.since_0_1})
    for d in wanted:
        if d.name in f and not schema.dtype_matches(d, f[d.name].dtype):
            rep.problems.append(f"'{d.name}' has dtype {f[d.name].dtype}, not the declared {d.dtype}")
    absent = [a for a in schema.ATTRS if a not in f.attrs and a != schema.A_COMPLETE]  # `complete`: its own problem
    report_missing(rep, "attribute(s)", absent, set(schema.ATTRS_SINCE_0_1))


def report_missing(rep: Report, what: str, names: list, older: set) -> None:
    """Names a file lacks: problems, except those an older ilias-ray did not write yet (warnings)."""
    now = [n for n in names if n not in older]
    old = [n for n in names if n in older]
    if now:
        rep.problems.append(f"missing {what}: {', '.join(now)}")
    if old:
        rep.warnings.append(f"missing {what}: {', '.join(old)} (made by an older ilias-ray?)")


def check_open_file(f, rep: Report) -> None:
    """The per-file checks on an open HDF5 file."""
    missing = [d.name for d in (INDEX, FEATURES) if d.name not in f]
    if missing:
        rep.problems.append(f"missing dataset(s): {', '.join(missing)}")
        return
    if not bool(f.attrs.get(schema.A_COMPLETE, False)):
        rep.problems.append("not marked complete")
    settings = {}
    if schema.A_SETTINGS in f.attrs:
        settings = json.loads(f.attrs[schema.A_SETTINGS])
        rep.run = json.loads(f.attrs.get(schema.A_RUN, "{}"))
    else:
        rep.problems.append(f"settings not recorded (no '{schema.A_SETTINGS}' attribute)")
    per_token = settings.get("pooling") == "local"
    if settings:
        check_schema(f, rep, per_token)
    ids = _strings(f[INDEX.name])
    rep.rows = len(ids)
    rep.dtype = str(f[FEATURES.name].dtype)
    rep.dim = int(f[FEATURES.name].shape[1]) if f[FEATURES.name].ndim == 2 else 0
    recorded_rows = f.attrs.get(schema.A_ROWS)
    if recorded_rows is not None and int(recorded_rows) != rep.rows:
        rep.problems.append(f"'{schema.A_ROWS}' says {int(recorded_rows)} but '{INDEX.name}' has {rep.rows}")
    if SKIPPED_INDEX.name in f:
        rep.skipped = f[SKIPPED_INDEX.name].shape[0]
        if SKIPPED_REASON.name not in f or f[SKIPPED_REASON.name].shape[0] != rep.skipped:
            rep.problems.append(f"'{SKIPPED_INDEX.name}' and '{SKIPPED_REASON.name}' differ in length")
    values, counts = np.unique(np.array(ids, dtype=object), return_counts=True) if ids else ([], [])
    repeated = {str(v) for v, c in zip(values, counts) if c > 1}
    dup = schema.DUPLICATE_INDEX.name
    expected = set(_strings(f[dup])) if dup in f else set()
    if repeated - expected:
        some = sorted(repeated - expected)
        rep.problems.append(f"{len(some)} repeated ID(s), e.g. {', '.join(some[:3])}")
    if repeated & expected:
        rep.warnings.append(f"{len(repeated & expected)} ID(s) repeated as in the input itself (see '{dup}')")
    check_features(f, rep, per_token=per_token)
    for unit in json.loads(f.attrs.get(schema.A_UNITS, "[]")):
        if unit.get("end", "eof") != "eof":
            rep.warnings.append(
                f"unit {unit.get('name')} ended early ({unit['end']}): its rows before the break are kept"
            )
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
        return sum(
            1 for n, info in Location.of(dataset_dir).list() if n.endswith(".tar") and info.type == pafs.FileType.File
        )
    except UserError:
        return None


def verify(hdf5_dir: str, out=print, strict: bool = False) -> int:
    """Print the table; return the exit status (0: no problem, 1: problems, or warnings if strict)."""
    where = Location.of(hdf5_dir)
    where.check_dir("--hdf5_dir")
    listing = sorted(where.list())
    files = [n for n, info in listing if n.endswith(schema.SUFFIX) and info.type == pafs.FileType.File]
    unfinished = [n for n, _ in listing if schema.unfinished(n)]
    if not files and not unfinished:
        raise UserError(f"no .hdf5 files in {where}")
    reports = [check_file(where / n) for n in files]
    general = [f"unfinished run: {n} (rerun the same command to complete it)" for n in unfinished]
    general += chunk_gaps(reports, count_tars)

    header = ("file", "rows", "skipped", "dim", "dtype", "status")
    table = [
        (
            r.name,
            str(r.rows),
            str(r.skipped),
            str(r.dim),
            r.dtype,
            "ok" if not r.problems else f"{len(r.problems)} problem(s)",
        )
        for r in reports
    ]
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
    out(
        f"verify: {len(reports)} file(s), {n_problems} problem(s), {n_warnings} warning(s)"
        + (" (--strict: warnings fail)" if strict and n_warnings and not n_problems else "")
    )
    return 1 if n_problems or (strict and n_warnings) else 0
