"""plan/planner.py on the sample: which outputs, which units, what format, and what an earlier run
finished; no Ray."""

from __future__ import annotations

from ilias_ray.config import Config
from ilias_ray.plan.planner import make_plan
from ilias_ray.plan_types import Source


def test_the_plan_of_a_joint_image_run(sample, tmp_path):
    cfg = Config(
        dataset_dir=str(sample["core"]),
        distractors_dir=str(sample["yfcc"]),
        hdf5_dir=str(tmp_path),
        partition="image_queries,positives,distractors",
        tar_batch_size=2,
        store_fp16=False,
        pooling="local",
    )
    cfg.validate()
    plan = make_plan(cfg)
    names = [o.name for o in plan.outputs]
    assert names == [
        "features_image_queries.hdf5",
        "features_positives.hdf5",
        "features_distractors_00000.hdf5",
        "features_distractors_00001.hdf5",
    ]
    assert [o.index for o in plan.outputs] == [0, 1, 2, 3] and plan.done == [] and not plan.notes
    assert [u.uid for u in plan.units] == list(range(len(plan.units)))  # one uid per unit, in output order
    assert all(u.out == o.index for o in plan.outputs for u in o.units)
    queries, positives, first, second = plan.outputs
    assert [u.source for u in queries.units] == [Source.FOLDER] and queries.units[0].count == sample["n_queries"]
    assert [u.name for u in first.units + second.units] == [f"{i:05d}.tar" for i in range(sample["n_shards"])]
    assert all(u.source == Source.TAR and u.count is None and u.size > 0 for u in first.units)
    assert first.settings["shards"] == ["00000.tar", "00001.tar"] and first.run_settings["dataset_dir"] == str(
        sample["yfcc"]
    )
    assert not any(o.done for o in plan.outputs) and all(u.record is None for u in plan.units)
    assert (plan.format.dtype, plan.format.compression, plan.format.per_token) == (
        "float32",
        cfg.hdf5_compression,
        True,
    )


def test_run_settings_are_recorded_without_credentials(sample, tmp_path):
    from ilias_ray.plan.planner import recorded_run

    cfg = Config(dataset_dir=str(sample["core"]), hdf5_dir=str(tmp_path), partition="image_queries")
    assert recorded_run(cfg)["dataset_dir"] == str(sample["core"])
    leaky = Config(dataset_dir="s3://bucket/x?sig=1&token=abc", hdf5_dir=str(tmp_path), partition="image_queries")
    assert "abc" not in str(recorded_run(leaky))
