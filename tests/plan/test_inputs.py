"""plan/inputs.py: the files a partition lists stay inside --dataset_dir."""

from __future__ import annotations

import shutil

from conftest import CNN_FLAGS, one_line_error


def test_listed_files_cannot_leave_the_dataset_dir(sample, tmp_path, capsys):
    """`..` or an absolute path in --selected_ids would read files outside --dataset_dir."""
    core = tmp_path / "core"
    shutil.copytree(sample["core"], core)
    query = next(p for p in sorted(core.rglob("*.jpg")) if "quer" in str(p) and str(p).isascii())
    shutil.copy(query, tmp_path / "private.jpg")  # beside the dataset, not in it
    inside = query.relative_to(core).as_posix()
    for bad in ("../private.jpg", f"{inside.split('/')[0]}/../../private.jpg", str(tmp_path / "private.jpg")):
        ids = tmp_path / "ids.txt"
        ids.write_text(f"{inside}\n{bad},some other column\n")
        err = one_line_error(
            [
                "extract",
                "--dataset_dir",
                str(core),
                "--hdf5_dir",
                str(tmp_path / "out"),
                "--partition",
                "uned",
                "--selected_ids",
                str(ids),
                *CNN_FLAGS,
            ],
            capsys,
        )
        assert f"{bad!r} is not a path below --dataset_dir" in err, err
    assert not (tmp_path / "out").exists()
