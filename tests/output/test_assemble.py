"""The HDF5 output on its own: the assembled file is what the schema declares, the commit step runs
from the parts store without a sink, and `verify` checks files against the same declaration."""

from __future__ import annotations

import json

import h5py
import numpy as np
from test_parts import write_unit

from ilias_ray.output import schema as hdf5_out
from ilias_ray.output.assemble import assemble
from ilias_ray.output.parts import PartsStore
from ilias_ray.output.schema import ATTRS, DATASETS
from ilias_ray.plan_types import Output, OutputFormat, Source, Unit
from ilias_ray.storage.location import Location

SETTINGS = {"x": 1, "pooling": "local"}


def committed(tmp_path, per_token=True, dtype="float32"):
    """Two units written to the parts store, then the commit step, as the driver runs it on resume."""
    out = Location.of(str(tmp_path))
    store = PartsStore(out, "f.hdf5")
    store.begin(SETTINGS)
    units = [[("a/0", 1), ("a/1", 0), ("a/2", 2)], [("b/0", 3), ("b/1", 1)]]
    records = {k: write_unit(store, k, rows, dtype=dtype) for k, rows in enumerate(units)}
    output = Output(
        index=0,
        name="f.hdf5",
        dir=out,
        units=tuple(Unit(k, 0, Source.TAR, f"{k}.tar", record=records[k]) for k in range(2)),
        settings=SETTINGS,
        run_settings={"batch_size": 8},
    )
    assemble(output, OutputFormat(dtype=dtype, compression=0, per_token=per_token), records)
    return tmp_path / "f.hdf5"


def test_the_commit_builds_the_declared_file_from_the_parts_and_removes_them(tmp_path):
    path = committed(tmp_path)
    assert not (tmp_path / "f.hdf5.parts").exists() and not (tmp_path / "f.hdf5.partial").exists()
    with h5py.File(path, "r") as f:
        assert sorted(f) == sorted(d.name for d in DATASETS)
        assert sorted(f.attrs) == sorted(ATTRS)
        for d in DATASETS:
            assert hdf5_out.dtype_matches(d, f[d.name].dtype), d.name
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
    with h5py.File(committed(tmp_path, per_token=False, dtype="float16"), "r") as f:
        assert "offsets" not in f and f["features"].dtype == np.float16
