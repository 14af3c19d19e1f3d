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
import random
import re
import tempfile
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from ilias_ray.config import UserError

CHUNK = 8 << 20  # bytes per ranged read: a few requests per second per stream, bounded memory
AHEAD = 2  # ranged reads in flight per stream (the network overlaps the tar parsing)
ATTEMPTS = 5  # tries per read or upload before a transient error fails the run
BACKOFF_S = 0.5  # first retry delay; doubles each time, with jitter
BACKOFF_MAX_S = 8.0
SECRET_PARAMS = re.compile(r"(key|secret|token|password|passwd|credential|signature)", re.I)
# Errors that no retry can fix (pyarrow passes the AWS/GCS error names through in the text).
PERMANENT = (
    "NO_SUCH_BUCKET",
    "NoSuchBucket",
    "ACCESS_DENIED",
    "AccessDenied",
    "HTTP status 403",
    "INVALID_ACCESS_KEY_ID",
    "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH",
    "NO_SUCH_KEY",
    "PERMISSION_DENIED",
    "Path does not exist",
)


def is_uri(where: str) -> bool:
    return "://" in where


def redact(text: str) -> str:
    """`text` with the `user:password@` part and secret-looking query values of URIs removed."""
    text = re.sub(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@", r"\1", text)
    return re.sub(
        r"([?&][^=&\s]*(?:key|secret|token|password|passwd|credential|signature)[^=&\s]*=)[^&\s]*",
        r"\1***",
        text,
        flags=re.I,
    )


def check_credentials_free(flag: str, where: Optional[str]) -> None:
    """Refuse a URI that carries credentials: they belong in the environment, never in flags."""
    if not where or not is_uri(where):
        return
    parts = urlsplit(where)
    secret_query = [k for k, _ in parse_qsl(parts.query) if SECRET_PARAMS.search(k)]
    if "@" in parts.netloc or secret_query:
        raise UserError(
            f"{flag} {redact(where)}: credentials in a URI are not accepted; use the standard "
            "AWS/GCP environment, config files or instance roles"
        )


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


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts) if p)


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


# -- errors and retries --
def transient(e: BaseException) -> bool:
    """A failure that a later try may not see: throttling, a dropped connection, a short read."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(e, OSError) and not any(p in str(e) for p in PERMANENT)


def reason(e: BaseException) -> str:
    """A short, credential-free reason for a failed I/O call."""
    text = str(e)
    if isinstance(e, FileNotFoundError) or "NO_SUCH_KEY" in text or "Path does not exist" in text:
        return "not found"
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return "the bucket does not exist"
    if isinstance(e, PermissionError) or any(
        p in text for p in ("ACCESS_DENIED", "AccessDenied", "HTTP status 403", "PERMISSION_DENIED")
    ):
        return "access denied"
    if "INVALID_ACCESS_KEY_ID" in text or "SIGNATURE_DOES_NOT_MATCH" in text:
        return "the credentials were refused"
    text = re.sub(r"\s*\(Request ID: [^)]*\)", "", text).strip().splitlines()
    return redact(text[0] if text else type(e).__name__)


def backoff(attempt: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_S * 2 ** (attempt - 1)) * (0.5 + random.random())


class Retries:
    """How many retries this process made (reported in the run's summary)."""

    count = 0
    lock = threading.Lock()

    @classmethod
    def add(cls) -> None:
        with cls.lock:
            cls.count += 1


def retry(fn, where, doing: str = "read", attempts: Optional[int] = None):
    """fn(), retried with backoff on transient errors; any failure left is one UserError line."""
    attempts = attempts or ATTEMPTS
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as e:
            if transient(e) and attempt < attempts:
                Retries.add()
                time.sleep(backoff(attempt))
                continue
            raise failure(doing, where, e, attempt) from None


def failure(doing: str, where, e: OSError, attempts: int = 1) -> UserError:
    """The one-line error of a failed I/O call; `.transient` says whether a later try may work."""
    tries = f" (after {attempts} tries)" if attempts > 1 else ""
    err = UserError(f"cannot {doing} {where}: {reason(e)}{tries}")
    err.transient = transient(e)
    return err


class ObjectReader(io.RawIOBase):
    """Reads one object front to back with ranged reads, AHEAD of them in flight.

    Each range is retried on its own (the same bytes at the same offset), and a range that comes
    back short before the object's end is a failed read, never an early end of the data."""

    def __init__(self, f, where, chunk: Optional[int] = None, ahead: Optional[int] = None):
        super().__init__()
        self.f, self.where, self.chunk = f, where, chunk or CHUNK
        ahead = AHEAD if ahead is None else ahead
        self.size = f.size()
        self.next = 0  # offset of the next range to request
        self.pending = deque()  # (offset, length, future)
        self.pool = ThreadPoolExecutor(ahead, thread_name_prefix="ilias-read") if ahead else None
        self.ahead = ahead
        self.buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    @staticmethod
    def get(f, off: int, n: int) -> bytes:
        data = f.read_at(n, off)
        if len(data) != n:
            raise OSError(f"short read: {len(data)} of {n} bytes at offset {off}")
        return data

    def _get(self, off: int, n: int) -> bytes:
        return self.get(self.f, off, n)

    def _request(self) -> None:
        while len(self.pending) < max(self.ahead, 1) and self.next < self.size:
            n = min(self.chunk, self.size - self.next)
            fut = self.pool.submit(self._get, self.next, n) if self.pool else None
            self.pending.append((self.next, n, fut))
            self.next += n

    def _take(self) -> bytes:
        off, n, fut = self.pending.popleft()
        self._request()
        if fut is not None:
            try:
                return fut.result()
            except OSError as e:
                if not transient(e):
                    raise failure("read", self.where, e) from None
                Retries.add()  # the read-ahead failed: this range is asked for again, here
                time.sleep(backoff(1))
        return retry(lambda: self._get(off, n), self.where)

    def readinto(self, b) -> int:
        if not self.buf:
            self._request()
            if not self.pending:
                return 0
            self.buf = memoryview(self._take())
        n = min(len(b), len(self.buf))
        b[:n] = self.buf[:n]
        self.buf = self.buf[n:]
        return n

    def close(self) -> None:
        if self.pool is not None:
            for _, _, fut in self.pending:
                fut.cancel()
            self.pool.shutdown(wait=True)
            self.pool = None
        self.pending.clear()
        super().close()


class RangeFile(io.RawIOBase):
    """A seekable, read-only file over ranged reads of one object (each read retried)."""

    def __init__(self, f, where):
        super().__init__()
        self.f, self.where, self.pos, self.size = f, where, 0, f.size()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            b[:n] = retry(lambda: ObjectReader.get(self.f, self.pos, n), self.where)
            self.pos += n
        return n


def local_copy(where: str, sha256: Optional[str]) -> str:
    """A local path holding the bytes of `where`: itself when local, else a download cached under
    ILIAS_RAY_CACHE_DIR (default ~/.cache/ilias-ray), checked against the driver's `sha256`."""
    loc = Location.of(where)
    if loc.local:
        return where
    root = os.environ.get("ILIAS_RAY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ilias-ray")
    folder = os.path.join(root, "downloads", sha256 or hashlib.sha256(where.encode()).hexdigest())
    path = os.path.join(folder, loc.name)  # the name keeps its suffix (.safetensors, .pth)
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        retry(
            lambda: pafs.copy_files(
                loc.path, tmp, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem()
            ),
            loc,
        )
        got = Location.of(tmp).sha256()
        if sha256 and got != sha256:
            raise UserError(f"{loc} changed since the run started (its sha256 is now {got[:12]}...)")
        os.replace(tmp, path)  # other actors on this node may do the same: same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def iter_lines(loc: Location) -> Iterator[str]:
    with io.TextIOWrapper(loc.open_reader(), encoding="utf-8") as f:
        yield from f
