"""cli/sweep.py: a model's whole run, as the reference's cluster script makes it, as Configs."""

from __future__ import annotations

import pytest


def test_job_commands_follow_the_reference_run():
    from ilias_ray.cli.flags import command_line, overrides
    from ilias_ray.cli.sweep import model_configs, select_rows

    extra = overrides(["--batch_size", "64", "--store_fp16", "false"])
    assert extra == {"batch_size": 64, "store_fp16": False}  # only the flags given, typed as on the command line
    cfgs = model_configs(
        "timm", "vit_large_patch16_siglip_384.webli", "/core", "/yfcc", "/out", total_tars=20, settings=extra
    )
    # The image partitions are one job (one model load); the text tower is a second.
    assert [c.partition for c in cfgs] == ["image_queries,positives,distractors", "text_queries"]
    image, text = cfgs
    assert (
        image.dataset_dir == "/core" and image.distractors_dir == "/yfcc" and image.hdf5_dir == text.hdf5_dir == "/out"
    )
    assert image.total_tars == 20 and text.total_tars is None and text.distractors_dir is None
    assert text.framework == "text" and image.framework == "timm"
    assert image.batch_size == text.batch_size == 64 and not image.store_fp16  # the extra flags reach every job
    assert "--partition text_queries" in command_line(text) and "--batch_size 64" in command_line(text)
    assert "--store_fp16 false" in command_line(image) and "--resolution" not in command_line(text)
    assert [c.partition for c in model_configs("fb", "dinov2_vitl14", "/core", "/yfcc", "/out")] == [
        "image_queries,positives,distractors"
    ]
    assert [c.partition for c in model_configs("fb", "dinov2_vitl14", "/core", None, "/out")] == [
        "image_queries,positives"
    ]
    with pytest.raises(SystemExit):  # a wrong flag stops the job before any extraction, as on the command line
        overrides(["--batch_size", "many"])
    rows = select_rows("^DINOv2")
    assert rows and all(r["framework"] == "fb" for r in rows)
