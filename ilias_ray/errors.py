"""User errors: a mistake the user can fix, raised anywhere (the driver, a read task, a decode task, a
model actor, a sink) and reported by the CLI as one line.

The bottom of the package: it imports nothing of ours. Ray hands an error raised in a task or an
actor to the driver wrapped (`RayTaskError`, whose `cause` is the original, and which is also an
instance of the original's class); Ray Data wraps a stage's errors once more unless
`DataContext.raise_original_map_exception` is set, which the job sets (job/session.py). `causes`
walks such chains; `user_error` finds ours by its type, never by its text.
"""

from __future__ import annotations

from typing import Iterator, Optional


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line and exits non-zero."""


def causes(e: Optional[BaseException]) -> Iterator[BaseException]:
    """`e`, then what it wraps: Ray's `cause` (a task's or an actor's error), else `__cause__`;
    each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__


def user_error(e: BaseException) -> Optional[UserError]:
    """The UserError behind `e`, also when Ray wrapped it (raised inside a task or an actor): the
    innermost, as Ray's wrapper is an instance of the original's class too, with a traceback for
    its text."""
    found = [c for c in causes(e) if isinstance(c, UserError)]
    return found[-1] if found else None


def one_line(e: BaseException) -> str:
    """The first line of an error's text, or '' when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
