"""job/session.py: what the run's Ray connection sets, and what a submitted job's runtime env already
gives its workers."""

from __future__ import annotations

import json

from ilias_ray.config import Config
from ilias_ray.job.session import init_ray, job_env_vars


def test_a_submitted_jobs_env_vars_are_read_and_nothing_else(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert job_env_vars() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"A": "1"}}}))
    assert job_env_vars() == {"A": "1"}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "not json")
    assert job_env_vars() == {}


def test_the_run_sets_ray_data_once(ray_cluster):
    init_ray(Config(dataset_dir=".", hdf5_dir="."))
    ctx = ray_cluster.data.DataContext.get_current()
    # Waiting minutes for autoscaled GPU nodes must not count as "no progress" (default: 30 min).
    assert ctx.execution_no_progress_timeout_s >= 6 * 3600
    # A stage's error reaches the driver as itself: the CLI finds a UserError by its type (errors.py).
    assert ctx.raise_original_map_exception is True
    assert ctx.enable_progress_bars is False  # our own per-file lines read well in job logs
