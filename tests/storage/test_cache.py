"""storage/cache.py: a local file is used where it is; anything else is copied once per node, checked."""

from __future__ import annotations

import hashlib

from ilias_ray.storage.cache import local_copy


def test_a_local_path_is_used_as_it_is(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"weights")
    assert local_copy(str(p), hashlib.sha256(b"weights").hexdigest()) == str(p)


def test_a_download_is_checked_before_it_gets_its_name(tmp_path):
    import pytest

    from ilias_ray.errors import UserError
    from ilias_ray.storage.cache import verified

    good = hashlib.sha256(b"weights").hexdigest()
    path = str(tmp_path / "cache" / "w.pt")
    fetched = []

    def fetch(tmp, data=b"weights"):
        fetched.append(tmp)
        with open(tmp, "wb") as f:
            f.write(data)

    assert verified(path, fetch, good, "https://x/w.pt") == path and len(fetched) == 1
    assert verified(path, fetch, good, "https://x/w.pt") == path and len(fetched) == 1  # cached: no download
    other = str(tmp_path / "cache" / "v.pt")
    with pytest.raises(UserError, match=r"sha256 mismatch for the download of https://x/v.pt .*delete it and retry"):
        verified(other, lambda tmp: fetch(tmp, b"not the weights"), good, "https://x/v.pt")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["w.pt"]  # nothing else left behind
    (tmp_path / "cache" / "w.pt").write_bytes(b"truncated")
    with pytest.raises(UserError, match=r"sha256 mismatch for .*w\.pt .*delete it and retry"):
        verified(path, fetch, good, "https://x/w.pt")  # a damaged cached file is not used
