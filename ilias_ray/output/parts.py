"""The parts store: an output's finished units, on disk or in a bucket, until the output is assembled.

Every unit (tar shard, or folder list) K of output NAME becomes three objects in `NAME.hdf5.parts/`
beside the output (`parts_location`):
- `K.feat`: the unit's vectors, raw, in row order (the run's dtype, `dim` values each);
- `K.rows`: one JSON line per row, in position order: `[id, nvec]` for a row with `nvec`
  vectors in `K.feat`, `[id, 0, reason]` for a skipped one;
- `K.json`: the unit's completion record (RECORD_FIELDS), written last: it is the proof. It names
  the byte sizes of the other two, so a torn or replaced part file is seen and the unit redone.
`meta.json` holds the settings' fingerprint: parts left by other settings are never reused.

Both part files are written in a local staging folder (the parts folder itself when local) and
published when the unit is done (a rename, or an upload to a bucket); the staged copy stays for
the assembly. This module is the only one that knows these names and file formats; the sink and
the assembly read a record's fields (RECORD_FIELDS).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow.fs as pafs

from ilias_ray.output.schema import PARTS_SUFFIX, fingerprint, parts_location
from ilias_ray.storage.location import Location

META = "meta.json"
EXTS = ("feat", "rows")  # the part files of a unit, besides its record
# K.json: rows owed (count), how the input ended, rows and skipped written, vectors and their dim,
# IDs the input repeats, read retries, and the byte sizes of K.feat and K.rows.
RECORD_FIELDS = (
    "count",
    "end",
    "rows",
    "skipped",
    "vectors",
    "dim",
    "duplicates",
    "retries",
    "feat_bytes",
    "rows_bytes",
)
LISTING_THREADS = 16  # concurrent small reads (part records) from a bucket
READ_ROWS = 8192  # rows per block when reading a part back: memory does not grow with the unit


def finished_units(parts: Location, settings: dict) -> dict:
    """Completion records {unit index: record} that an interrupted run of the same settings left
    in `parts`. A record counts only if its part files are there with the sizes it names."""
    if parts.info().type != pafs.FileType.Directory:
        return {}
    files = {rel: info.size for rel, info in parts.list() if info.type == pafs.FileType.File}
    meta = _json_or_none(parts / META) if META in files else None
    if not meta or meta.get("fingerprint") != fingerprint(settings):
        return {}
    names = [n for n in files if n.endswith(".json") and n[:-5].isdigit()]
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        found = dict(zip(names, pool.map(lambda n: _json_or_none(parts / n), names)))
    return {int(n[:-5]): rec for n, rec in found.items() if isinstance(rec, dict) and _parts_match(n[:-5], rec, files)}


def _parts_match(k: str, record: dict, files: dict) -> bool:
    """A unit's part files are all there, with the sizes its record names (else: redo the unit)."""
    for ext in EXTS:
        size, want = files.get(f"{k}.{ext}"), record.get(f"{ext}_bytes")
        if size is None or (want is not None and size != want):
            return False
    return True


def _json_or_none(loc: Location):
    try:
        return json.loads(loc.read_bytes())
    except ValueError:
        return None


@dataclass
class Block:
    """Up to READ_ROWS consecutive rows of a part: the kept rows' IDs, their vector counts and
    vectors (sum(nvec) x dim), and the skipped rows among them as (id, reason)."""

    ids: list
    nvec: list
    vectors: np.ndarray
    skipped: list


class PartWriter:
    """One unit's rows, appended in the order given to `K.feat` and `K.rows` in the staging
    folder (opened at the first row: a run with thousands of units does not hold thousands of
    files open). `close` publishes both, then writes the record, and returns it."""

    def __init__(self, store: "PartsStore", k: int, dtype: str):
        self.store, self.k, self.dtype = store, k, dtype
        self.base = os.path.join(store.staging, str(k))
        self.rows = self.skipped = self.vectors = 0
        self.dim = 0
        self.feat = self.lines = None

    def _open(self) -> None:
        self.feat = open(self.base + ".feat.tmp", "wb")
        self.lines = open(self.base + ".rows.tmp", "w")

    def add(self, id_: str, vectors: np.ndarray) -> None:
        """A row and its vectors: a (vectors, dim) array in the run's dtype."""
        if self.feat is None:
            self._open()
        nvec, self.dim = vectors.shape
        self.feat.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self.lines.write(json.dumps([id_, nvec]) + "\n")
        self.rows += 1
        self.vectors += nvec

    def skip(self, id_: str, reason: str) -> None:
        if self.feat is None:
            self._open()
        self.lines.write(json.dumps([id_, 0, reason]) + "\n")
        self.skipped += 1

    def close(self, count: Optional[int], end: str, repeated_ids: list, retries: int) -> dict:
        """Make the unit durable: fsync, publish both part files, then write its record (last)."""
        if self.feat is None:
            self._open()
        for f in (self.feat, self.lines):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        sizes = {ext: os.path.getsize(f"{self.base}.{ext}.tmp") for ext in EXTS}
        for ext in EXTS:  # the staged copy stays for the assembly
            (self.store.loc / f"{self.k}.{ext}").publish(f"{self.base}.{ext}.tmp", keep_as=f"{self.base}.{ext}")
        record = {
            "count": count,
            "end": end,
            "rows": self.rows,
            "skipped": self.skipped,
            "vectors": self.vectors,
            "dim": self.dim,
            "duplicates": repeated_ids,  # the on-disk name of the IDs the input repeats
            "retries": retries,
            "feat_bytes": sizes["feat"],
            "rows_bytes": sizes["rows"],
        }
        (self.store.loc / f"{self.k}.json").write_bytes(json.dumps(record).encode())  # last: the proof
        return record


class PartsStore:
    """The parts of one output: `loc` (beside the output, maybe in a bucket) and `staging` (a
    local folder; the same folder when the output is local)."""

    def __init__(self, out_dir: Location, name: str):
        self.loc = parts_location(out_dir, name)
        self.staging = os.path.join(out_dir.staging(), name + PARTS_SUFFIX)

    def begin(self, settings: dict) -> None:
        """Ready to write units for `settings` (records of other settings are then never read)."""
        os.makedirs(self.staging, exist_ok=True)
        self.loc.makedirs()
        meta = {"fingerprint": fingerprint(settings), "settings": settings}
        (self.loc / META).write_bytes(json.dumps(meta).encode())

    def writer(self, k: int, dtype: str) -> PartWriter:
        return PartWriter(self, k, dtype)

    def _open(self, k: int, ext: str):
        """A finished unit's part file: the staged copy, else the published one (an earlier run's)."""
        staged = os.path.join(self.staging, f"{k}.{ext}")
        return open(staged, "rb") if os.path.exists(staged) else (self.loc / f"{k}.{ext}").open_reader()

    def read(self, k: int, dim: int, dtype: str, rows: int = READ_ROWS) -> Iterator[Block]:
        """Unit k's rows, in order, in blocks of up to `rows` rows (kept and skipped together)."""
        itemsize = np.dtype(dtype).itemsize
        with (
            self._open(k, "rows") as raw,
            io.TextIOWrapper(raw, encoding="utf-8") as lines,
            self._open(k, "feat") as blob,
        ):
            block = []

            def cut() -> Block:
                kept = [r for r in block if r[1] != 0]
                n = sum(r[1] for r in kept)
                vecs = np.frombuffer(blob.read(n * dim * itemsize), dtype).reshape(n, dim) if kept else None
                return Block(
                    [r[0] for r in kept], [r[1] for r in kept], vecs, [(r[0], r[2]) for r in block if r[1] == 0]
                )

            for line in lines:
                block.append(json.loads(line))
                if len(block) >= rows:
                    yield cut()
                    block = []
            if block:
                yield cut()

    def remove(self) -> None:
        """After the output is published: the parts and their staged copies are no longer needed."""
        try:
            self.loc.delete_dir()
        except OSError:  # the file is complete; a leftover parts folder is only untidy
            pass
        shutil.rmtree(self.staging, ignore_errors=True)

    def drop_staged(self) -> None:
        """Before a run: drop a bucket's local staged copies (the bucket is the record; its parts are
        read from there). When local, the staging folder is the parts folder itself: kept."""
        if not self.loc.local and os.path.isdir(self.staging):
            shutil.rmtree(self.staging)
