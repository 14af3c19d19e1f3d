"""storage/retry.py: which failures are tried again, within a bound, and the one line the others give."""

from __future__ import annotations

import pytest

from ilias_ray.errors import UserError
from ilias_ray.storage import retry as r


@pytest.mark.parametrize(
    "e, transient, reason",
    [
        (OSError("AWS Error SLOW_DOWN during GetObject"), True, "AWS Error SLOW_DOWN during GetObject"),
        (OSError("short read: 3 of 8 bytes at offset 0"), True, "short read: 3 of 8 bytes at offset 0"),
        (FileNotFoundError("x"), False, "not found"),
        (PermissionError("x"), False, "access denied"),
        (OSError("AWS Error ACCESS_DENIED during HeadObject"), False, "access denied"),
        (OSError("AWS Error NO_SUCH_BUCKET"), False, "the bucket does not exist"),
        (OSError("AWS Error INVALID_ACCESS_KEY_ID"), False, "the credentials were refused"),
        (OSError("x (Request ID: ABC123)\nmore"), True, "x"),
        (ValueError("not an OSError"), False, "not an OSError"),
    ],
)
def test_transient_and_reason(e, transient, reason):
    assert r.transient(e) is transient and r.reason(e) == reason


def test_a_reason_names_no_credentials():
    e = OSError("cannot open s3://user:secret@bucket/a?X-Amz-Signature=abc")
    assert "secret" not in r.reason(e) and "abc" not in r.reason(e)


def test_backoff_doubles_within_its_bound():
    for attempt in range(1, 12):
        base = min(r.BACKOFF_MAX_S, r.BACKOFF_S * 2 ** (attempt - 1))
        assert 0.5 * base <= r.backoff(attempt) <= 1.5 * base


def test_retry_tries_transient_failures_again_and_gives_one_line(monkeypatch):
    monkeypatch.setattr(r, "backoff", lambda attempt: 0.0)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("connection reset")
        return "data"

    before = r.Retries.count
    assert r.retry(flaky, "s3://b/x") == "data" and len(calls) == 3 and r.Retries.count == before + 2
    with pytest.raises(UserError, match=r"^cannot read s3://b/y: connection reset \(after 2 tries\)$") as e:
        r.retry(lambda: (_ for _ in ()).throw(OSError("connection reset")), "s3://b/y", attempts=2)
    assert e.value.transient is True
    calls.clear()
    with pytest.raises(UserError, match=r"^cannot write s3://b/z: not found$") as e:
        r.retry(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError()), "s3://b/z", doing="write")
    assert calls == [1] and e.value.transient is False  # a permanent failure is not tried again
