"""What a failed read or write means, and how often it is tried again.

Transient errors (throttling, dropped connections, short reads) are retried with backoff, within
a bound (ATTEMPTS); anything else, or the last failure, is a one-line UserError that names the
object. `Retries` counts the retries of this process, for the run's summary."""

from __future__ import annotations

import random
import re
import threading
import time
from typing import Optional

from ilias_ray.errors import UserError
from ilias_ray.storage.credentials import redact

ATTEMPTS = 5  # tries per read or upload before a transient error fails the run
BACKOFF_S = 0.5  # first retry delay; doubles each time, with jitter
BACKOFF_MAX_S = 8.0


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
