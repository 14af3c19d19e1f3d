"""job/progress.py: the driver's lines."""

from __future__ import annotations

import numpy as np


def test_progress_lines(capsys):
    from types import SimpleNamespace

    from ilias_ray.job.progress import Progress

    plan = SimpleNamespace(outputs=[SimpleNamespace(name="features_distractors_00000.hdf5")])
    p = Progress(plan, every=0)
    row = lambda rows, frac, done: {  # noqa: E731
        "out": np.array([0]),
        "rows": np.array([rows]),
        "skipped": np.array([1]),
        "fraction": np.array([frac]),
        "finished": np.array([done]),
        "truncated": np.array([0]),
        "repeated_ids": np.array([0]),
        "retries": np.array([0]),
    }
    p.update(row(99, 0.25, False))
    p.update(row(399, 1.0, True))
    p.update(row(199, 0.5, False))  # an older row, late (several sink-stage tasks are in flight)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[features_distractors_00000.hdf5] 99 rows, 1 skipped")
    assert "img/s" in lines[0] and "25.0%  ETA " in lines[0]
    assert lines[1].endswith("done")
    assert p.totals() == {
        "rows": 399,
        "skipped": 1,
        "finished": ["features_distractors_00000.hdf5"],
        "truncated_shards": 0,
        "repeated_ids": 0,
        "read_retries": 0,
    }
