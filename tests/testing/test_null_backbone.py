"""The null backbone (`--framework null`, bench/scale.py): test-only, and D-wide features at no cost."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from conftest import one_line_error
from ilias_ray.config import FRAMEWORKS
from ilias_ray.errors import UserError
from ilias_ray.models.registry import build, check, framework


def test_unknown_without_the_test_switch(monkeypatch, sample, tmp_path, capsys):
    monkeypatch.delenv("ILIAS_RAY_TESTING", raising=False)
    assert "null" not in FRAMEWORKS  # not in --help, the models table or the model contract tests
    with pytest.raises(UserError, match="unknown --framework 'null'"):
        framework("null")
    args = ["extract", "--dataset_dir", str(sample["yfcc"]), "--hdf5_dir", str(tmp_path)]
    err = one_line_error(args + ["--partition", "distractors", "--framework", "null", "--model", "null_1024"], capsys)
    assert "unknown --framework 'null'" in err


def test_build_gives_the_declared_width(monkeypatch):
    monkeypatch.setenv("ILIAS_RAY_TESTING", "1")
    check("null", "null_1024", pooling="head")
    with pytest.raises(UserError, match="no model 'null_x'"):
        check("null", "null_x", pooling="head")
    with pytest.raises(UserError, match="--pooling gem is not supported"):
        check("null", "null_1024", pooling="gem")
    bb = build("null", "null_1024")
    x = torch.rand(5, 3, 17, 23)
    f = bb.head(x)
    assert bb.dim == 1024 and f.shape == (5, 1024) and torch.isfinite(f).all()
    assert not torch.equal(f[0], f[1])  # rows differ (by the first pixel)
    assert build("null", "null_16").head(x).shape == (5, 16)


def test_a_run_through_ray(ray_cluster, sample, tmp_path):
    """The whole pipeline with the null backbone, in its own driver (the switch reaches the workers)."""
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ilias_ray", "extract", "--dataset_dir", str(sample["yfcc"])]
    cmd += ["--hdf5_dir", str(tmp_path), "--address", address, "--partition", "distractors"]
    cmd += ["--framework", "null", "--model", "null_16", "--resolution", "32", "--pretrained", "false"]
    cmd += ["--num_workers", "1", "--model_actors", "1"]  # fewer processes to start: cheaper
    p = subprocess.run(cmd, env=dict(os.environ, ILIAS_RAY_TESTING="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(tmp_path / "features_distractors_00000.hdf5") as f:
        feats = f["features"][:]
        assert feats.dtype == np.float16 and feats.shape[1] == 16 and len(feats) > 0
        np.testing.assert_allclose(np.linalg.norm(feats.astype(np.float32), axis=1), 1, atol=1e-2)
