"""plan/outdir.py: an output directory without room is one line before any Ray work."""

from __future__ import annotations


def test_full_disk_before_the_run_is_one_line(sample, tmp_path, monkeypatch, capsys):
    import shutil as sh
    from collections import namedtuple

    from ilias_ray.cli import main as cli

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    rc = cli.main(
        [
            "extract",
            "--dataset_dir",
            str(sample["core"]),
            "--hdf5_dir",
            str(tmp_path),
            "--model",
            "resnet18",
            "--pretrained",
            "false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has only 1 MiB free" in err[0]
