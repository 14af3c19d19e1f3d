"""storage/ranged.py: an object read front to back in ranges, with reads ahead, gives its bytes exactly;
a short range before the end is a failed read, never an early end of the data."""

from __future__ import annotations

import io
import os

import pyarrow.fs as pafs
import pytest

from ilias_ray.errors import UserError
from ilias_ray.storage.ranged import ObjectReader, RangeFile


@pytest.fixture
def blob(tmp_path):
    data = os.urandom(100_003)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return pafs.LocalFileSystem().open_input_file(str(path)), data


@pytest.mark.parametrize("chunk, ahead", [(1 << 20, 2), (4096, 0), (4096, 3), (7, 1)])
def test_reads_front_to_back_whatever_the_ranges(blob, chunk, ahead):
    f, data = blob
    with io.BufferedReader(ObjectReader(f, "blob", chunk=chunk, ahead=ahead), buffer_size=1000) as r:
        assert r.read() == data


def test_seeks_and_reads_anywhere(blob):
    f, data = blob
    rf = RangeFile(f, "blob")
    rf.seek(99_000)
    assert rf.read(10) == data[99_000:99_010]
    rf.seek(5)
    assert rf.read(3) == data[5:8] and rf.tell() == 8


class Short:
    """A file whose ranged reads come back one byte short (a cut connection)."""

    def __init__(self, f):
        self.f = f

    def size(self):
        return self.f.size()

    def read_at(self, n, off):
        return self.f.read_at(n, off)[:-1]


def test_a_short_range_is_a_failed_read(blob, monkeypatch):
    from ilias_ray.storage import retry

    monkeypatch.setattr(retry, "ATTEMPTS", 1)
    f, _ = blob
    with pytest.raises(UserError, match=r"cannot read blob: short read: 4095 of 4096 bytes at offset 0"):
        ObjectReader(Short(f), "blob", chunk=4096, ahead=0).read(10)
