"""Local copies of remote files (checkpoints, published weights): downloaded once per node into a
cache folder, checked against their sha256, then reused. Only a verified file ever gets its final
name: a download goes to a temporary file first."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Optional

import pyarrow.fs as pafs

from ilias_ray.errors import UserError
from ilias_ray.storage.location import Location
from ilias_ray.storage.retry import retry


class ChecksumMismatch(UserError):
    """A file whose sha256 is not the one expected (`got`)."""

    def __init__(self, text: str, got: str):
        super().__init__(text)
        self.got = got


def verified(path: str, fetch, sha256: Optional[str], what: str) -> str:
    """`path`, downloaded by `fetch(tmp)` first unless it exists, and, when `sha256` is given, checked
    (a file already there too). `what` names the source in errors."""
    if os.path.exists(path):
        got = Location.of(path).sha256()
        if sha256 and got != sha256:
            raise ChecksumMismatch(f"sha256 mismatch for {path} (got {got}, want {sha256}); delete it and retry", got)
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        fetch(tmp)
        got = Location.of(tmp).sha256()
        if sha256 and got != sha256:
            raise ChecksumMismatch(
                f"sha256 mismatch for the download of {what} (got {got}, want {sha256}); delete it and retry", got
            )
        os.replace(tmp, path)  # other processes on this node may do the same: same bytes
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def cache_root() -> str:
    return os.environ.get("ILIAS_RAY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ilias-ray")


def local_copy(where: str, sha256: Optional[str]) -> str:
    """A local path holding the bytes of `where`: itself when local, else a download cached under
    ILIAS_RAY_CACHE_DIR (default ~/.cache/ilias-ray), checked against the driver's `sha256`."""
    loc = Location.of(where)
    if loc.local:
        return where
    folder = os.path.join(cache_root(), "downloads", sha256 or hashlib.sha256(where.encode()).hexdigest())

    def fetch(tmp):
        copy = lambda: pafs.copy_files(  # noqa: E731
            loc.path, tmp, source_filesystem=loc.fs, destination_filesystem=pafs.LocalFileSystem()
        )
        retry(copy, loc)

    try:
        return verified(os.path.join(folder, loc.name), fetch, sha256, str(loc))  # the name keeps its suffix
    except ChecksumMismatch as e:
        raise UserError(f"{loc} changed since the run started (its sha256 is now {e.got[:12]}...)") from None
