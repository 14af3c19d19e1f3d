"""`ilias-ray verify`: a clean directory passes; each kind of damage is found and fails it."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_assemble import committed

from ilias_ray.config import Config
from ilias_ray.job.run import run
from ilias_ray.output import verify as verify_module

CLI = [sys.executable, "-m", "ilias_ray", "verify", "--hdf5_dir"]


@pytest.fixture(scope="module")
def clean(ray_cluster, sample, tmp_path_factory):
    """Three distractor chunks (one shard each) and the image queries."""
    out = tmp_path_factory.mktemp("verify")
    opts = dict(model="resnet18", pretrained=False, resolution=64, hdf5_dir=str(out))
    run(Config(dataset_dir=str(sample["yfcc"]), partition="distractors", tar_batch_size=1, **opts))
    run(Config(dataset_dir=str(sample["core"]), partition="image_queries", **opts))
    return out


def verify(path):
    return subprocess.run(CLI + [str(path)], capture_output=True, text=True, timeout=120)


def damaged(clean, tmp_path, edit):
    d = tmp_path / "d"
    shutil.copytree(clean, d)
    edit(d)
    return verify(d)


def test_a_clean_directory_passes(clean):
    p = verify(clean)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["file", "rows", "skipped", "dim", "dtype", "status"]
    assert [ln.split()[0] for ln in lines[1:5]] == [
        "features_distractors_00000.hdf5",
        "features_distractors_00001.hdf5",
        "features_distractors_00002.hdf5",
        "features_image_queries.hdf5",
    ]
    assert all(ln.split()[-1] == "ok" for ln in lines[1:5])
    assert lines[-1] == "verify: 4 file(s), 0 problem(s), 0 warning(s)"


def set_rows(name, fn):
    def edit(d):
        with h5py.File(d / name, "r+") as f:
            fn(f)

    return edit


def nan_row(f):
    x = f["features"][0]
    x[3] = np.nan
    f["features"][0] = x


def long_row(f):
    f["features"][1] = f["features"][1] * 2


def repeated_id(f):
    f["index"][1] = f["index"][0]


def drop_features(f):
    del f["features"]


def not_complete(f):
    f.attrs["complete"] = False


def no_settings(f):
    del f.attrs["ilias_ray_settings"]


def short_features(f):
    f["features"].resize(f["features"].shape[0] - 1, axis=0)


@pytest.mark.parametrize(
    "edit, telltale",
    [
        (set_rows("features_image_queries.hdf5", nan_row), "NaN or inf"),
        (set_rows("features_image_queries.hdf5", long_row), "L2 norm is not 1"),
        (set_rows("features_image_queries.hdf5", repeated_id), "repeated ID(s)"),
        (set_rows("features_image_queries.hdf5", drop_features), "missing dataset(s): features"),
        (set_rows("features_image_queries.hdf5", not_complete), "not marked complete"),
        (set_rows("features_image_queries.hdf5", no_settings), "settings not recorded"),
        (set_rows("features_distractors_00000.hdf5", short_features), "rows but 'index' has"),
        (lambda d: (d / "features_distractors_00001.hdf5").unlink(), "features_distractors_00001.hdf5"),
        (lambda d: (d / "features_distractors_00002.hdf5").unlink(), "features_distractors_00002.hdf5"),
        (lambda d: (d / "features_positives.hdf5.partial").write_bytes(b"x"), "unfinished run"),
        (lambda d: (d / "features_positives.hdf5").write_bytes(b"not hdf5"), "not a readable HDF5 file"),
    ],
)
def test_each_problem_is_found(clean, tmp_path, edit, telltale):
    p = damaged(clean, tmp_path, edit)
    assert p.returncode == 1, p.stdout
    problems = [ln for ln in p.stdout.splitlines() if ln.startswith("problem:")]
    assert problems and any(telltale in ln for ln in problems), p.stdout


def test_not_a_directory_is_one_line(tmp_path):
    p = verify(tmp_path / "missing")
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "not a directory" in p.stderr


def test_units_that_ended_early_and_empty_files_are_warnings_strict_fails(ray_cluster, sample, tmp_path):
    """A shard cut short and a file with no rows pass, with a warning naming them; --strict fails."""
    import tarfile

    shards = tmp_path / "yfcc"
    shards.mkdir()
    data = (sample["yfcc"] / "00001.tar").read_bytes()
    (shards / "a.tar").write_bytes(data[: len(data) // 2])  # truncated part-way
    tarfile.open(shards / "b.tar", "w").close()  # a valid tar with nothing in it
    out = tmp_path / "out"
    run(
        Config(
            dataset_dir=str(shards),
            hdf5_dir=str(out),
            partition="distractors",
            tar_batch_size=1,
            model="resnet18",
            pretrained=False,
            resolution=64,
        )
    )
    p = verify(out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "warning: features_distractors_00000.hdf5: unit a.tar ended early (truncated" in p.stdout
    assert "warning: features_distractors_00001.hdf5: 0 rows" in p.stdout
    assert p.stdout.splitlines()[-1] == "verify: 2 file(s), 0 problem(s), 2 warning(s)"
    strict = subprocess.run(CLI + [str(out), "--strict"], capture_output=True, text=True, timeout=120)
    assert strict.returncode == 1 and "(--strict: warnings fail)" in strict.stdout


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
    assert verify_module.verify(str(tmp_path)) == 0
    with h5py.File(path, "r+") as f:
        edit(f)
    capsys.readouterr()
    assert verify_module.verify(str(tmp_path)) == (1 if level == "problem" else 0)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(f"{level}:")]
    assert any(telltale in ln for ln in lines), lines
    assert verify_module.verify(str(tmp_path), strict=True) == 1
