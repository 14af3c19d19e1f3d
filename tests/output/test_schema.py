"""output/schema.py: the names of an output's files, the declared dtypes, and the fingerprint of its
settings (pinned: files written by earlier versions must keep matching)."""

from __future__ import annotations

import h5py
import numpy as np

from ilias_ray.output import schema
from ilias_ray.storage.location import Location


def test_each_field_says_its_dtype():
    f16, f32, f64 = np.dtype("float16"), np.dtype("float32"), np.dtype("float64")  # as h5py gives them
    assert schema.dtype_matches(schema.FEATURES, f16) and schema.dtype_matches(schema.FEATURES, f32)
    assert not schema.dtype_matches(schema.FEATURES, f64)
    assert schema.dtype_matches(schema.INDEX, h5py.string_dtype("ascii"))
    assert not schema.dtype_matches(schema.INDEX, h5py.string_dtype("utf-8"))
    assert schema.dtype_matches(schema.SKIPPED_REASON, h5py.string_dtype("utf-8"))
    assert schema.dtype_matches(schema.OFFSETS, np.dtype("int64"))
    assert not schema.dtype_matches(schema.OFFSETS, np.dtype("int32"))
    assert [d.name for d in schema.DATASETS if d.per_token] == ["offsets"]


def test_unfinished_names_and_where_a_file_is_built(tmp_path):
    assert schema.unfinished("f.hdf5.partial") and schema.unfinished("f.hdf5.parts")
    assert not schema.unfinished("f.hdf5") and not schema.unfinished("f.hdf5.lock")
    assert schema.partial_path(Location.of(str(tmp_path)), "f.hdf5") == str(tmp_path / "f.hdf5.partial")
    assert schema.parts_location(Location.of(str(tmp_path)), "f.hdf5") == Location.of(str(tmp_path)) / "f.hdf5.parts"


def test_the_fingerprint_is_of_the_sorted_settings():
    a = schema.fingerprint({"b": 1, "a": [1, 2]})
    assert a == schema.fingerprint({"a": [1, 2], "b": 1}) != schema.fingerprint({"a": [1, 2], "b": 2})
    assert schema.settings_json({"b": 1, "a": 2}) == '{"a": 2, "b": 1}'
    assert len(a) == 64 and set(a) <= set("0123456789abcdef")
