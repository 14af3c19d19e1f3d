"""The HDF5 output on its own: the assembled file is what the schema declares, the commit step runs
from the parts store without a sink, and `verify` checks files against the same declaration."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from ilias_ray import hdf5_out
from ilias_ray.hdf5_out import ATTRS, DATASETS, OutputSpec, RunInfo, UnitSpec, assemble
from ilias_ray.parts import PartsStore
from ilias_ray.storage import Location
from ilias_ray.verify import verify
from test_parts import write_unit

SETTINGS = {"x": 1, "pooling": "local"}


def committed(tmp_path, local=True, dtype="float32"):
    """Two units written to the parts store, then the commit step, as the driver runs it on resume."""
    out = Location.of(str(tmp_path))
    store = PartsStore(out, "f.hdf5")
    store.begin(SETTINGS)
    units = [[("a/0", 1), ("a/1", 0), ("a/2", 2)], [("b/0", 3), ("b/1", 1)]]
    records = {k: write_unit(store, k, rows, dtype=dtype) for k, rows in enumerate(units)}
    spec = OutputSpec(
        name="f.hdf5",
        dir=out,
        settings=SETTINGS,
        units=tuple(UnitSpec(k, f"{k}.tar", None, 0, records[k]) for k in range(2)),
        run_settings={"batch_size": 8},
    )
    assemble(spec, RunInfo(dtype=dtype, compression=0, local=local), records)
    return tmp_path / "f.hdf5"


def test_the_commit_builds_the_declared_file_from_the_parts_and_removes_them(tmp_path):
    path = committed(tmp_path)
    assert not (tmp_path / "f.hdf5.parts").exists() and not (tmp_path / "f.hdf5.partial").exists()
    with h5py.File(path, "r") as f:
        assert sorted(f) == sorted(d.name for d in DATASETS)
        assert sorted(f.attrs) == sorted(ATTRS)
        for d in DATASETS:
            assert hdf5_out.kind_matches(d, f[d.name].dtype), d.name
        assert list(f["index"].asstr()[()]) == ["a/0", "a/2", "b/0", "b/1"]
        assert f["offsets"][()].tolist() == [0, 1, 3, 6, 7]
        assert f["features"].shape == (7, 4)
        # write_unit fills a row's vectors with the row's position in its unit
        assert f["features"][:, 0].tolist() == [0, 2, 2, 0, 0, 0, 1]
        assert list(f["skipped_index"].asstr()[()]) == ["a/1"]
        assert list(f["skipped_reason"].asstr()[()]) == ["bad 1"]
        assert json.loads(f.attrs["units"]) == [
            {"name": "0.tar", "rows": 3, "end": "eof"},
            {"name": "1.tar", "rows": 2, "end": "eof"},
        ]
        assert json.loads(f.attrs["run"]) == {"batch_size": 8}
        assert f.attrs["num_rows"] == 4 and f.attrs["num_skipped"] == 1 and f.attrs["complete"]


def test_global_pooling_has_no_offsets(tmp_path):
    with h5py.File(committed(tmp_path, local=False, dtype="float16"), "r") as f:
        assert "offsets" not in f and f["features"].dtype == np.float16


def unit_norm(f):
    x = f["features"][()]
    f["features"][...] = np.ones_like(x) / np.sqrt(x.shape[1])


@pytest.mark.parametrize(
    "edit, telltale, level",
    [
        (lambda f: f.__delitem__("offsets"), "missing dataset(s): offsets", "problem"),
        (
            lambda f: (f.__delitem__("skipped_reason"), f.create_dataset("skipped_reason", data=np.array([7]))),
            "'skipped_reason' has dtype int64, not the declared utf-8",
            "problem",
        ),
        (lambda f: f.attrs.__delitem__("units"), "missing attribute(s): units", "problem"),
        # What an older ilias-ray did not write is a warning: `verify` passes, `verify --strict` does not.
        (
            lambda f: f.attrs.__delitem__("num_input_duplicates"),
            "missing attribute(s): num_input_duplicates",
            "warning",
        ),
        (lambda f: f.__delitem__("duplicate_index"), "missing dataset(s): duplicate_index", "warning"),
    ],
)
def test_verify_checks_files_against_the_declaration(tmp_path, capsys, edit, telltale, level):
    path = committed(tmp_path)
    with h5py.File(path, "r+") as f:
        unit_norm(f)
    assert verify(str(tmp_path)) == 0
    with h5py.File(path, "r+") as f:
        edit(f)
    capsys.readouterr()
    assert verify(str(tmp_path)) == (1 if level == "problem" else 0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{level}:")]
    assert any(telltale in ln for ln in lines), lines
    assert verify(str(tmp_path), strict=True) == 1
