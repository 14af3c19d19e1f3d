"""One writer per output: a lock per output file, held by the driver for the whole run.

Two runs writing one output (the same command started twice, or two models sharing a folder
and the default --hdf5_name) would take over each other's parts and could finish a file with
rows from both. So before touching an output's parts, a run takes `NAME.hdf5.lock` beside it:

- Local --hdf5_dir: an OS lock (`flock`) on that file, which the OS releases when the process
  ends, however it ends. The file holds who has it (host, pid, start time) for the message.
- A bucket has no locks: the object is a lease (owner, host, pid, start, a renewal counter)
  that a thread of the driver rewrites every LEASE_S / 3 seconds. A run that finds another
  run's lease watches it for LEASE_S seconds (its own clock, so clocks need not agree): a lease
  renewed meanwhile belongs to a live run, and the run stops with one line; a lease nobody
  renews was left by a killed run and is taken over. Two runs taking over at once: the last
  writer wins, and the other sees it when it reads the lease back.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid

import pyarrow.fs as pafs

from ilias_ray.errors import UserError
from ilias_ray.storage.location import Location

SUFFIX = ".lock"
SETTLE_S = 1.0  # after writing a lease, wait this long before reading it back (take-over races)


def lease_seconds() -> float:
    """How long a lease lives without renewal (ILIAS_RAY_LEASE_S, default 60)."""
    return float(os.environ.get("ILIAS_RAY_LEASE_S") or 60)


def me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def busy(name: str, holder: dict, how: str) -> UserError:
    who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"
    return UserError(
        f"{name} is being written by another run ({who}){how}; wait for it to finish, or stop it "
        "(Ctrl-C does not stop a submitted job: `ray job stop`) and rerun: finished shards are kept"
    )


class FileLock:
    """flock on a local lock file; gone with the process."""

    def __init__(self, loc: Location, name: str):
        self.path, self.name, self.fd = loc.path, name, None

    def acquire(self) -> None:
        for _ in range(10):  # the holder may unlink the file as we open it: open it again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = _json(os.pread(fd, 4096, 0))
                os.close(fd)
                raise busy(self.name, holder, "") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)
        raise UserError(f"{self.path}: could not take the lock (the file keeps changing)")

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # while still held: no other run holds a lock on this file
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def lost(self):
        return None


class Lease:
    """A lease object in a bucket, renewed by a thread until released."""

    def __init__(self, loc: Location, name: str):
        self.loc, self.name = loc, name
        self.mine = dict(me(), owner=uuid.uuid4().hex, renewals=0)
        self.stop = threading.Event()
        self.thread = None
        self.taken_by = None  # set if another run took the lease over while we ran

    def read(self):
        """The lease as it is now, or None when there is none."""
        try:
            return _json(self.loc.read_bytes())
        except UserError:
            if self.loc.info().type != pafs.FileType.File:
                return None  # none, or just released
            raise

    def acquire(self) -> None:
        period = lease_seconds()
        seen = self.read()
        if seen and seen.get("owner") != self.mine["owner"]:
            if not self._gone(seen, period):
                raise busy(self.name, seen, " and renews its lease")
        self.loc.write_bytes(json.dumps(self.mine).encode())
        time.sleep(SETTLE_S)
        now = self.read()
        if not now or now.get("owner") != self.mine["owner"]:
            raise busy(self.name, now or {}, " and took the lease as this run did")
        self.thread = threading.Thread(target=self._renew, args=(period / 3,), daemon=True, name="ilias-lease")
        self.thread.start()

    def _gone(self, seen: dict, period: float) -> bool:
        """True if nobody renews `seen` for `period` seconds; False as soon as someone does."""
        if seen.get("host") == socket.gethostname() and not _alive(seen.get("pid")):
            return True  # left by a process of this machine that is gone
        print(
            f"ilias-ray: {self.name} has a lease of another run (host {seen.get('host')}, pid {seen.get('pid')}, "
            f"started {seen.get('started')}); waiting up to {period:.0f} s to see whether it is still running",
            flush=True,
        )
        deadline = time.monotonic() + period
        while time.monotonic() < deadline:
            time.sleep(min(1.0, period / 10))
            now = self.read()
            if now is None:
                return True  # released
            if now != seen:
                return False  # renewed, or taken by a third run: alive
        return True

    def _renew(self, every: float) -> None:
        while not self.stop.wait(every):
            try:
                now = self.read()
                if now and now.get("owner") != self.mine["owner"]:
                    self.taken_by = now
                    return
                self.mine["renewals"] += 1
                self.loc.write_bytes(json.dumps(self.mine).encode())
            except UserError:
                pass  # a failed renewal is retried at the next tick; the lease outlives a few

    def release(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
            try:
                now = self.read()
                if now and now.get("owner") == self.mine["owner"]:
                    self.loc.delete()
            except UserError:
                pass  # it expires on its own

    def lost(self):
        return self.taken_by


class OutputLocks:
    """The locks of every output a run writes; `with OutputLocks(dir, names):` holds them all."""

    def __init__(self, out_dir: Location, names: list):
        out_dir.makedirs()
        lock_class = FileLock if out_dir.local else Lease
        self.locks = [lock_class(out_dir / (n + SUFFIX), n) for n in sorted(names)]

    def __enter__(self):
        taken = []
        try:
            for lock in self.locks:
                lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        return self

    def __exit__(self, *exc):
        for lock in self.locks:
            lock.release()

    def check(self) -> None:
        """Fail the run if another run took one of its leases over (it stalled past the lease)."""
        for lock in self.locks:
            other = lock.lost()
            if other:
                raise busy(lock.name, other, " and took this run's lease over")


def _json(raw: bytes) -> dict:
    try:
        return json.loads(raw.decode("utf-8") or "{}")
    except ValueError:
        return {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError) as e:
        return isinstance(e, PermissionError)
    return True
