"""The contract between the stages (ilias_ray/rows.py): each stage's real output has exactly the
columns its declaration says, each stage gets what it needs from the one before, a mis-wired
batch fails at the stage's boundary naming the stage, and the README's table says the same."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ilias_ray.config import Config
from ilias_ray.hdf5_out import OutputSpec, RunInfo, UnitSpec
from ilias_ray.plan import Unit
from ilias_ray.preprocess import decode_batch
from ilias_ray.read import read_tar
from ilias_ray.rows import (
    DECODE,
    EMBED,
    PROGRESS_COLUMNS,
    READ,
    READ_SCHEMA,
    ROUTING,
    SINK,
    STAGES,
    Kind,
    StageInputError,
)
from ilias_ray.sink import Sink
from ilias_ray.storage import Location
from stages import decoder, embedder

README = Path(__file__).resolve().parent.parent / "README.md"


def settings(sample, **kw) -> dict:
    return dataclasses.asdict(
        Config(
            dataset_dir=str(sample["yfcc"]),
            hdf5_dir="unused",
            partition="distractors",
            model="resnet18",
            pretrained=False,
            resolution=64,
            **kw,
        )
    )


def test_kinds_keep_their_numbers():
    """Kinds travel as int8 in Arrow and are compared with numpy arrays: the numbers are the format."""
    assert [(k.name, int(k)) for k in Kind] == [
        ("TAR_IMAGE", 0),
        ("FILE_IMAGE", 1),
        ("TEXT", 2),
        ("SKIP", 3),
        ("MARKER", 4),
        ("IMAGE", 5),
    ]
    assert np.array([3, 5], np.int8).tolist() == [Kind.SKIP, Kind.IMAGE]


def test_each_stage_gets_what_it_needs_from_the_one_before():
    given = ()
    for stage in STAGES:
        assert set(stage.needs) <= set(given), (stage.name, set(stage.needs) - set(given))
        given = stage.output(given)
        if stage is not SINK:
            assert set(ROUTING) <= set(given), stage.name  # every row keeps its routing to the sink
    assert set(given) == set(PROGRESS_COLUMNS)


def test_real_stages_emit_exactly_their_declared_columns(sample, tmp_path):
    """read_tar -> decode_batch -> Embedder -> Sink on one real shard, columns checked at each step."""
    path = sample["yfcc"] / "00000.tar"
    unit = Unit(uid=0, out=0, kind="tar", name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    table = pa.concat_tables(list(read_tar(unit, None)))
    assert table.schema == READ_SCHEMA and tuple(table.column_names) == READ.output(())
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}

    s = settings(sample)
    decoded = decode_batch(batch, decoder(s))
    assert set(decoded) == set(DECODE.output(READ.output(())))
    assert Kind.IMAGE in decoded["kind"].tolist()

    embedded = embedder(s)(decoded)
    assert set(embedded) == set(EMBED.output(tuple(decoded)))

    out = OutputSpec(
        name="f.hdf5",
        dir=Location.of(str(tmp_path)),
        settings={"x": 1},
        units=(UnitSpec(0, path.name, None, unit.size, None),),
    )
    progress = Sink([out], RunInfo(dtype="float16", compression=0, local=False))(embedded)
    assert set(progress) == set(SINK.output(tuple(embedded)))
    assert bool(progress["finished"][0]) and (tmp_path / "f.hdf5").exists()


def test_a_miswired_batch_fails_at_the_boundary_naming_the_stage(sample, tmp_path):
    s = settings(sample)
    routing_only = {c: np.zeros(1, np.int64) for c in ROUTING}
    with pytest.raises(StageInputError, match=r"stage 'decode' got a batch without column\(s\) data, boxes"):
        decode_batch(routing_only, decoder(s))
    with pytest.raises(StageInputError, match=r"stage 'embed' got a batch without column\(s\) data, img, h, w, mask"):
        embedder(s)(routing_only)
    sink = Sink(
        [
            OutputSpec(
                name="f.hdf5",
                dir=Location.of(str(tmp_path)),
                settings={"x": 1},
                units=(UnitSpec(0, "a.tar", None, 0, None),),
            )
        ],
        RunInfo(dtype="float16", compression=0, local=False),
    )
    with pytest.raises(StageInputError, match=r"stage 'sink' got a batch without column\(s\) feat, nvec"):
        sink(routing_only)


def readme_columns() -> dict:
    """{column: (stage that adds it, stages that read it)} from the README's table of columns."""
    text = README.read_text()
    table = text[text.index("| column |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        readers = tuple(re.findall(r"\w+", cells[2]))
        for name in names:
            rows[name] = (cells[1], readers)
    return rows


def test_the_readme_table_of_columns_matches_the_declarations():
    declared = {}
    for stage in STAGES:
        for c in stage.adds:
            declared.setdefault(c, (stage.name, tuple(s.name for s in STAGES if c in s.needs)))
    assert readme_columns() == declared
