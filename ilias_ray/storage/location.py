"""Where bytes live: local paths and object-store URIs (s3://, gs://, ...) behind one layer.

Every input and output of a run is a `Location`: what the user named (a local path or a URI)
plus a path below it. Its pyarrow filesystem is made once per process from the URI, so a local
directory and a bucket take the same code path. The few things that differ (a rename versus
a whole-object upload, where files are staged before they are published) are methods here,
not branches in the pipeline.

Invariants:
- Credentials never pass through here as text. A URI with `user:password@` or a secret query
  parameter is refused; credentials and endpoints come from the standard places (the AWS/GCP
  environment, config files, instance roles, `AWS_ENDPOINT_URL`), and every name shown to a
  user goes through `redact`.
- An object appears under its final name only when it is complete. Small objects are one PUT;
  files are published by a rename (local) or by pyarrow's own copy, with no Python code running
  in the middle of the upload, and the uploaded size is checked.
- "Cannot read" is never "no data": a missing, denied or failing read raises a one-line
  `UserError` that names the object. Transient errors (throttling, dropped connections, short
  reads) are retried with backoff first, within a bound.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import pyarrow.fs as pafs

from ilias_ray.errors import UserError
from ilias_ray.storage.credentials import is_uri, redact
from ilias_ray.storage.ranged import CHUNK, ObjectReader, RangeFile
from ilias_ray.storage.retry import failure, reason, retry


@functools.lru_cache(maxsize=None)
def _filesystem(base: str):
    """(filesystem, path) of a location's base, made once per process."""
    if not is_uri(base):
        return pafs.LocalFileSystem(), base
    try:
        return pafs.FileSystem.from_uri(base)
    except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
        raise UserError(f"{redact(base)}: {reason(e)}") from None


def child(where: str, name: str) -> str:
    """`where` (a path or URI, maybe with a ?query) with `name` appended to its path."""
    path, sep, query = where.partition("?") if is_uri(where) else (where, "", "")
    return f"{path.rstrip('/')}/{name}{sep}{query}"


def join(*names: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(names) if p)


@dataclass(frozen=True)
class Location:
    """A file or directory: `base` as the user gave it (absolute if local), plus `rel` below it.

    Pickles as two strings; each process makes its own filesystem from `base`."""

    base: str
    rel: str = ""

    @classmethod
    def of(cls, where: str) -> "Location":
        return cls(where if is_uri(where) else os.path.abspath(where))

    def __truediv__(self, name: str) -> "Location":
        return Location(self.base, join(self.rel, name))

    def __str__(self) -> str:
        """The name users see: no credentials, no query."""
        base = redact(self.base)
        return join(base.split("?", 1)[0], self.rel) if is_uri(base) else join(base, self.rel)

    @property
    def local(self) -> bool:
        """On this machine's file system (a plain path, or a file:// URI)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def fs(self) -> pafs.FileSystem:
        return _filesystem(self.base)[0]

    @property
    def path(self) -> str:
        """The path inside `fs` (a local path when `local`)."""
        root = _filesystem(self.base)[1]
        return join(root, self.rel) if self.rel else root

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    # -- reading --
    def info(self) -> pafs.FileInfo:
        return retry(lambda: self.fs.get_file_info(self.path), self)

    def check_dir(self, flag: str) -> None:
        """One clear line unless this is a directory (or a prefix with objects under it)."""
        if self.info().type == pafs.FileType.Directory:
            return
        if self.local:
            raise UserError(f"{flag} {self} is not a directory")
        if not self.bucket_exists():
            raise UserError(f"{flag} {self}: the bucket {self.bucket()!r} does not exist")
        raise UserError(f"{flag} {self}: no objects under this prefix")

    def check_file(self, flag: str) -> pafs.FileInfo:
        info = self.info()
        if info.type == pafs.FileType.File:
            return info
        if not self.local and not self.bucket_exists():
            raise UserError(f"{flag} {self}: the bucket {self.bucket()!r} does not exist")
        raise UserError(f"{flag} {self}: no such file")

    def bucket(self) -> str:
        return self.path.split("/", 1)[0]

    def bucket_exists(self) -> bool:
        return retry(lambda: self.fs.get_file_info(self.bucket()), self).type == pafs.FileType.Directory

    def list(self, recursive: bool = False) -> list:
        """[(path below here, FileInfo)] of what is below; an unreadable listing is an error.

        Locally an entry that cannot be stat'ed (a broken link) has type Unknown: it is listed,
        not hidden, so that a missing input is an error instead of a smaller dataset."""
        if self.local:
            return self._list_local(recursive)
        sel = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=False)
        infos = retry(lambda: self.fs.get_file_info(sel), self)
        prefix = self.path.rstrip("/") + "/"
        return [(i.path[len(prefix) :] if i.path.startswith(prefix) else i.base_name, i) for i in infos]

    def _list_local(self, recursive: bool) -> list:
        out = []

        def walk_error(e: OSError):
            raise failure("list", self, e)

        for dirpath, dirs, files in os.walk(self.path, onerror=walk_error):
            rel_dir = os.path.relpath(dirpath, self.path)
            for name in sorted(dirs):
                out.append(
                    (
                        join(rel_dir, name) if rel_dir != "." else name,
                        pafs.FileInfo(os.path.join(dirpath, name), pafs.FileType.Directory),
                    )
                )
            for name in sorted(files):
                full = os.path.join(dirpath, name)
                try:
                    info = pafs.FileInfo(full, pafs.FileType.File, size=os.stat(full).st_size)
                except OSError:
                    info = pafs.FileInfo(full, pafs.FileType.Unknown)
                out.append((join(rel_dir, name) if rel_dir != "." else name, info))
            if not recursive:
                break
        return out

    def _open(self):
        """The object as a pyarrow random-access file (its size known from the start)."""
        return retry(lambda: self.fs.open_input_file(self.path), self)

    def open_reader(self) -> io.BufferedReader:
        """A buffered, front-to-back reader (ranged reads in flight, each retried on failure)."""
        f = self._open()
        return io.BufferedReader(ObjectReader(f, self), buffer_size=1 << 20)

    def read_bytes(self) -> bytes:
        f = self._open()
        size = f.size()
        if size <= CHUNK:  # one request, no read-ahead
            return retry(lambda: ObjectReader.get(f, 0, size), self) if size else b""
        with io.BufferedReader(ObjectReader(f, self)) as r:
            return r.read()

    def probe(self) -> None:
        """Read the first byte: a denied or failing read shows before any work starts."""
        f = self._open()
        if f.size():
            retry(lambda: f.read_at(1, 0), self)

    def sha256(self) -> str:
        h = hashlib.sha256()
        with self.open_reader() as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    @contextmanager
    def open_hdf5(self):
        """h5py.File for reading: by path when local, else over ranged reads of the object."""
        import h5py

        if self.local:
            with h5py.File(self.path, "r") as f:
                yield f
        else:  # HDF5 reads many small pieces: serve them from CHUNK-sized ranged reads
            raw = RangeFile(self._open(), self)
            with io.BufferedReader(raw, buffer_size=CHUNK) as buffered, h5py.File(buffered, "r") as f:
                yield f

    # -- writing --
    def makedirs(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        # A bucket has no directories: a prefix exists once an object is under it.

    def write_bytes(self, data: bytes) -> None:
        """Atomic: readers see the old object, or none, or all of `data`."""
        if self.local:
            tmp = f"{self.path}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
            return

        def put():
            out = self.fs.open_output_stream(self.path)  # data is ready: one write, then close
            out.write(data)
            out.close()

        retry(put, self, doing="write")

    def publish(self, local_path: str, keep_as: Optional[str] = None) -> None:
        """Make the finished local file `local_path` this object, durably.

        Local: fsync and rename (`local_path` is gone). Bucket: upload, check the size, and then
        move the local file to `keep_as` (or delete it)."""
        if self.local:
            with open(local_path, "rb") as f:
                os.fsync(f.fileno())
            os.replace(local_path, self.path)
            fsync_dir(os.path.dirname(self.path))
            return
        size = os.path.getsize(local_path)

        def upload():
            # pyarrow's C++ copy: no Python code runs while the multipart upload is open, so an
            # exception cannot close (and so complete) a half-written object under this name.
            pafs.copy_files(
                local_path, self.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
            got = self.fs.get_file_info(self.path).size
            if got != size:
                raise OSError(f"uploaded {got} of {size} bytes")

        retry(upload, self, doing="write")
        if keep_as:
            os.replace(local_path, keep_as)
        else:
            os.remove(local_path)

    def delete(self) -> None:
        try:
            if self.local:
                os.remove(self.path)
            else:
                self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_dir(self) -> None:
        try:
            self.fs.delete_dir(self.path)
        except FileNotFoundError:
            pass

    def check_writable(self, flag: str) -> None:
        """Write and delete a small object: a missing bucket or a denied write shows now."""
        probe = self / f".ilias-ray-write-test-{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.delete()
        except UserError as e:
            raise UserError(f"{flag} {self} is not writable: {str(e).split(': ', 1)[-1]}") from None

    def staging(self) -> str:
        """The local directory where files bound for here are written before they are published:
        the directory itself when local, else one under ILIAS_RAY_STAGING_DIR (or the temp dir)."""
        if self.local:
            return self.path
        root = os.environ.get("ILIAS_RAY_STAGING_DIR") or os.path.join(tempfile.gettempdir(), "ilias-ray-staging")
        key = hashlib.sha256(f"{self.base}\n{self.rel}".encode()).hexdigest()[:16]
        return os.path.join(root, key)


def fsync_dir(path: str) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_lines(loc: Location) -> Iterator[str]:
    with io.TextIOWrapper(loc.open_reader(), encoding="utf-8") as f:
        yield from f
