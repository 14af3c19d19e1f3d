"""Streamed reads of an object: ranged GETs, a few in flight, each retried on its own."""

from __future__ import annotations

import io
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ilias_ray.storage.retry import Retries, backoff, failure, retry, transient

CHUNK = 8 << 20  # bytes per ranged read: a few requests per second per stream, bounded memory
AHEAD = 2  # ranged reads in flight per stream (the network overlaps the tar parsing)


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
