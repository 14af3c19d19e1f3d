"""cli/flags.py: every `ilias-ray extract` flag comes from its declaration on Config, with its type,
choices, bounds and help; mistakes are argparse's one line."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import one_line_error
from ilias_ray.cli import main as cli
from ilias_ray.config import POOLINGS, Config


def extract_actions() -> dict:
    sub = cli.build_parser()._subparsers._group_actions[0].choices["extract"]
    return {a.dest: a for a in sub._actions if a.dest != "help"}


def test_every_flag_comes_from_its_declaration():
    actions = extract_actions()
    declared = {f.name: f for f in dataclasses.fields(Config)}
    # Every setting is a flag, except the digests validate() fills in.
    assert set(actions) == set(declared) - {"checkpoint_sha256", "selected_ids_sha256"}
    for name, a in actions.items():
        f = declared[name]
        assert a.option_strings == [f"--{name}"] and a.help
        assert a.required == (f.default is dataclasses.MISSING)
        if not a.required:
            assert a.default == f.default, name
        assert a.choices == f.metadata["choices"], name
    assert actions["pooling"].choices == POOLINGS


def test_flag_types_and_spellings():
    args = ["extract", "--dataset_dir", "d", "--hdf5_dir", "h"]
    cfg = cli.config_from_args(cli.build_parser().parse_args(args))
    assert cfg == Config(dataset_dir="d", hdf5_dir="h")  # the command line's defaults are Config's
    cfg = cli.config_from_args(
        cli.build_parser().parse_args(
            args
            + [
                "--multiscale",
                "ON",
                "--store_fp16",
                "0",
                "--use_gpu",
                "auto",
                "--total_tars",
                "3",
                "--model_actors",
                "2",
                "--checkpoint",
                "w.pt",
                "--resolution",
                "224",
            ]
        )
    )
    assert (cfg.multiscale, cfg.store_fp16, cfg.use_gpu, cfg.total_tars, cfg.model_actors) == (True, False, None, 3, 2)
    assert (cfg.checkpoint, cfg.resolution) == ("w.pt", 224)
    assert cli.build_parser().parse_args(args + ["--use_gpu", "true"]).use_gpu is True


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--overwrite", "maybe"],
            "argument --overwrite: invalid value for a boolean flag: 'maybe' (use true/false, on/off, 1/0)",
        ),
        (
            ["--use_gpu", "yes"],
            "argument --use_gpu: invalid value for a boolean flag: 'yes' (use true/false, on/off, 1/0)",
        ),
        (["--resolution", "big"], "argument --resolution: invalid int value: 'big'"),
        (
            ["--pooling", "max"],
            "argument --pooling: invalid choice: 'max' (choose from 'head', 'cls', 'gap', 'mac', "
            "'gem', 'rmac', 'rgem', 'local')",
        ),
    ],
)
def test_flag_errors_are_argparse_lines(args, message, capsys):
    line = one_line_error(["extract", "--dataset_dir", "d", "--hdf5_dir", "h", *args], capsys)
    assert line == f"ilias-ray extract: error: {message} (see --help)"


def test_a_missing_required_flag(capsys):
    line = one_line_error(["extract"], capsys)
    assert (
        line == "ilias-ray extract: error: the following arguments are required: --dataset_dir, --hdf5_dir (see --help)"
    )


def test_a_bound_error_from_the_command_line(capsys, tmp_path):
    line = one_line_error(
        ["extract", "--dataset_dir", str(tmp_path), "--hdf5_dir", str(tmp_path), "--min_size", "-1"], capsys
    )
    assert line == "ilias-ray: error: --min_size must be >= 0"


def test_help_lists_every_framework(capsys):
    from ilias_ray.config import FRAMEWORKS

    with pytest.raises(SystemExit) as e:
        cli.main(["extract", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"one of {', '.join(FRAMEWORKS)} " in text and len(FRAMEWORKS) == 10
    assert "(default: vit_large_patch16_siglip_384.webli)" in text


def test_help_says_only_the_first_column_is_the_id(capsys):
    try:
        cli.main(["extract", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    assert "only the first one is the ID" in text and "comma-separated" in text
