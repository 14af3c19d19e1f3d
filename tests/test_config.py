"""Every setting is declared once, on Config: the command line, the checks, the fingerprint and the
recorded run settings all come from those declarations, and stay what they were."""

from __future__ import annotations

import pytest

from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.output.schema import fingerprint

# The fingerprint of a default run's outputs. Files finished before the settings were declared on
# Config carry it: a rerun after any upgrade must compute the same keys, values and digest, or it
# would not find them and redo every file.
DEFAULT_OUTPUT_SETTINGS = {
    "partition": "image_queries",
    "framework": "timm",
    "model": "vit_large_patch16_siglip_384.webli",
    "pooling": "head",
    "transforms": "RESIZE_LARGE",
    "resolution": 512,
    "min_size": 0,
    "multiscale": False,
    "multirotate": False,
    "masking": False,
    "crop_resize": False,
    "comp_fp16": True,
    "store_fp16": True,
    "checkpoint_sha256": None,
    "pretrained": True,
    "selected_ids_sha256": None,
}


DEFAULT_FINGERPRINT = "da9b9ec05a996980cfcc5abc7b1a08d1916171c63ffb78773c09c16fbea85564"


# A distractor file's: the output settings plus its shards (plan.make_plan), with other values.
DISTRACTOR_FINGERPRINT = "6a16606beef243e0e546c49e7ce292932acac9c36c32b91bb61e901f060bc96c"


def default(**kw) -> Config:
    return Config(dataset_dir=".", hdf5_dir=".", **kw)


def test_output_settings_and_fingerprint_are_pinned():
    assert default().output_settings() == DEFAULT_OUTPUT_SETTINGS
    assert fingerprint(default().output_settings()) == DEFAULT_FINGERPRINT
    cfg = default(checkpoint_sha256="ab", multiscale=True, pooling="gem", partition="distractors")
    settings = dict(cfg.output_settings(), shards=["00000.tar"], shard_sizes=[10])
    assert fingerprint(settings) == DISTRACTOR_FINGERPRINT


def test_run_settings_are_where_and_how_not_what():
    assert default(checkpoint="w.pt", total_tars=3).run_settings() == {
        "dataset_dir": ".",
        "checkpoint": "w.pt",
        "selected_ids": None,
        "batch_size": 128,
        "start_tar": 0,
        "total_tars": 3,
        "tar_batch_size": 10,
    }
    assert not set(default().run_settings()) & set(DEFAULT_OUTPUT_SETTINGS)


@pytest.mark.parametrize(
    "kw,message",
    [
        (
            dict(partition="query"),
            "--partition must be one of image_queries, text_queries, positives, distractors, uned, not 'query'",
        ),
        (
            dict(transforms="RESIZE"),
            "--transforms must be one of RESIZE_LARGE, RESIZE_SMALL, RESIZE_CENTER, "
            "RESIZE_SQUARE, RESIZE_PAD, not 'RESIZE'",
        ),
        (dict(pooling="max"), "--pooling must be one of head, cls, gap, mac, gem, rmac, rgem, local, not 'max'"),
        (dict(resolution=0), "--resolution must be a positive integer"),
        (dict(batch_size=0), "--batch_size must be a positive integer"),
        (dict(webdl_batch_size=-1), "--webdl_batch_size must be a positive integer"),
        (dict(tar_batch_size=0), "--tar_batch_size must be a positive integer"),
        (dict(total_tars=0), "--total_tars must be a positive integer"),
        (dict(model_actors=0), "--model_actors must be a positive integer"),
        (dict(min_size=-1), "--min_size must be >= 0"),
        (dict(start_tar=-10), "--start_tar must be >= 0"),
        (dict(num_workers=-1), "--num_workers must be >= 0"),
        (dict(hdf5_compression=10), "--hdf5_compression is a gzip level: 0..9"),
        (dict(start_tar=5), "--start_tar (5) must be divisible by --tar_batch_size (10)"),
        (dict(sinks=0), "--sinks must be a positive integer"),
        # Several partitions in one run
        (
            dict(partition="image_queries,query"),
            "--partition must be one of image_queries, text_queries, positives, distractors, uned, not 'query'",
        ),
        (
            dict(partition="image_queries,text_queries"),
            "--partition text_queries is a run of its own; several partitions in one run are among "
            "image_queries, positives, distractors",
        ),
        (
            dict(partition="uned,distractors", distractors_dir="."),
            "--partition uned is a run of its own; several partitions in one run are among "
            "image_queries, positives, distractors",
        ),
        (dict(partition="positives, positives"), "--partition lists positives more than once"),
        (
            dict(partition="positives,distractors"),
            "--partition with distractors and other partitions needs --distractors_dir (the folder of tar shards); "
            "--dataset_dir is the ILIAS core folder",
        ),
        (
            dict(partition="image_queries,positives", selected_ids="ids.txt"),
            "with several partitions, --selected_ids applies to the distractors only",
        ),
        (
            dict(partition="positives", distractors_dir="."),
            "--distractors_dir goes with --partition distractors (alone, or with other partitions)",
        ),
    ],
)
def test_declared_choices_and_bounds_are_checked(kw, message):
    with pytest.raises(UserError) as e:
        default(**kw).validate()
    assert str(e.value) == message


def test_each_partition_of_a_run_is_the_run_of_it_alone():
    """Several partitions in one run: each part has the settings, fingerprint and run record of a
    run of that partition alone; the distractors take --distractors_dir and --selected_ids."""
    cfg = Config(
        dataset_dir="/core",
        distractors_dir="/yfcc",
        hdf5_dir="/out",
        partition="image_queries, positives,distractors",
        selected_ids="ids.txt",
        selected_ids_sha256="ab",
        total_tars=3,
    )
    parts = cfg.partition_runs()
    assert [p.partition for p in parts] == ["image_queries", "positives", "distractors"]
    queries, positives, distractors = parts
    assert queries == Config(dataset_dir="/core", hdf5_dir="/out", partition="image_queries", total_tars=3)
    assert positives.output_settings() == dict(DEFAULT_OUTPUT_SETTINGS, partition="positives")
    assert distractors == Config(
        dataset_dir="/yfcc",
        hdf5_dir="/out",
        partition="distractors",
        selected_ids="ids.txt",
        selected_ids_sha256="ab",
        total_tars=3,
    )
    assert distractors.run_settings()["dataset_dir"] == "/yfcc"
    # One partition: the run itself; --distractors_dir may name the shards' folder then too.
    one = default(partition="positives")
    assert one.partition_runs() == [one]
    spaced = default(partition=" positives")
    spaced.check_partitions()
    assert [p.partition for p in spaced.partition_runs()] == ["positives"]
    alone = Config(dataset_dir="/x", distractors_dir="/yfcc", hdf5_dir="/out", partition="distractors")
    assert [p.dataset_dir for p in alone.partition_runs()] == ["/yfcc"]
