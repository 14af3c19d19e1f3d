"""job/dataset.py: the stages as Ray Data sees them."""

from __future__ import annotations

from conftest import VIT


def test_decoding_is_its_own_stage_and_blocks_stay_whole(ray_cluster, sample, tmp_path, capsys, monkeypatch):
    """Reading and decoding are separate tasks, so a shard's blocks are decoded by as many tasks as
    the cluster has CPUs for; blocks travel as one packed row each (blocks.py), whole; the model
    stage emits no pixels; the driver sees only the sink's progress rows."""
    from ilias_ray.config import Config
    from ilias_ray.job.dataset import build_dataset
    from ilias_ray.job.run import run
    from ilias_ray.plan.planner import make_plan
    from ilias_ray.stages.blocks import PACKED, unpack

    cfg = Config(
        dataset_dir=str(sample["yfcc"]),
        hdf5_dir=str(tmp_path),
        partition="distractors",
        model=VIT,
        pretrained=False,
        resolution=64,
    ).validate()
    ds, _ = build_dataset(cfg, make_plan(cfg), ray_cluster)
    batch = ds.take_batch(2, batch_format="numpy")  # two blocks: the sample's shards make a few each
    assert set(batch) == {PACKED} and len(batch[PACKED]) == 2
    assert all(
        set(b) == {"seq", "out", "unit", "pos", "id", "source", "state", "reason", "offset", "unit_end", "feat"}
        for b in unpack(batch)
    )
    monkeypatch.setenv("ILIAS_RAY_STATS", "1")
    run(cfg)
    out = capsys.readouterr().out
    assert "ReadIlias" in out and "MapBatches(decode_blocks)" in out and "ReadIlias->" not in out  # not fused
    assert "MapBatches(route)" in out  # the sink stage: tasks that hand rows to the sink actors
