"""The contract between the stages (ilias_ray/stages/rows.py): each stage's real output has exactly the
columns its declaration says, each stage gets what it needs from the one before, a mis-wired
batch fails at the stage's boundary naming the stage, and ARCHITECTURE.md's table says the same."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from ilias_ray.config import Config
from ilias_ray.plan_types import Output, OutputFormat, Source, Unit
from ilias_ray.stages.decode import decode_batch
from ilias_ray.stages.read import read_tar
from ilias_ray.stages.rows import (
    DECODE,
    EMBED,
    PROGRESS_COLUMNS,
    READ,
    READ_SCHEMA,
    ROUTING,
    SINK,
    STAGES,
    StageInputError,
    State,
    UnitEnd,
)
from ilias_ray.stages.sink import Sink
from ilias_ray.storage.location import Location
from stage_settings import decoder, embedder

COLUMN_TABLE = Path(__file__).resolve().parents[2] / "ARCHITECTURE.md"  # the table of row columns


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


def test_sources_and_states_keep_their_numbers():
    """Where a row came from and what it is now travel as int8 in Arrow and are compared with numpy
    arrays: the numbers are the format."""
    assert [(k.name, int(k)) for k in Source] == [("TAR", 0), ("FOLDER", 1), ("TEXT", 2)]
    states = [("BYTES", 0), ("PIXELS", 1), ("SKIPPED", 2), ("END", 3), ("FEATURES", 4)]
    assert [(k.name, int(k)) for k in State] == states
    assert np.array([2, 1], np.int8).tolist() == [State.SKIPPED, State.PIXELS]


def test_a_unit_end_is_encoded_and_decoded_in_one_place():
    """The END row's fields travel in one typed column (an Arrow struct): what the read stage writes
    is what the sink reads, through Arrow and through the numpy blocks the stages see."""
    end = UnitEnd(count=7, end="truncated: ReadError: x", repeated_ids=("a.tar/1", "a.tar/2"), retries=2)
    arrow = pa.array([end.cell(), None], type=UnitEnd.ARROW)
    assert [UnitEnd.of(v) for v in arrow.to_pylist()] == [end, None]
    assert [UnitEnd.of(v) for v in arrow.to_numpy(zero_copy_only=False)] == [end, None]
    assert UnitEnd.of(pa.array([UnitEnd(3).cell()], type=UnitEnd.ARROW).to_pylist()[0]) == UnitEnd(3, "eof", (), 0)


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
    unit = Unit(uid=0, out=0, source=Source.TAR, name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    table = pa.concat_tables(list(read_tar(unit, None)))
    assert table.schema == READ_SCHEMA and tuple(table.column_names) == READ.output(())
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in table.column_names}

    s = settings(sample)
    decoded = decode_batch(batch, decoder(s))
    assert set(decoded) == set(DECODE.output(READ.output(())))
    assert State.PIXELS in decoded["state"].tolist()

    embedded = embedder(s)(decoded)
    assert set(embedded) == set(EMBED.output(tuple(decoded)))
    feats = [f for f, st in zip(embedded["feat"], embedded["state"]) if st == State.FEATURES]
    assert feats and all(f.ndim == 2 and f.shape[0] == 1 for f in feats)  # (vectors, dim): one vector each

    out = Output(index=0, name="f.hdf5", dir=Location.of(str(tmp_path)), units=(unit,), settings={"x": 1})
    progress = Sink([out], OutputFormat(dtype="float16", compression=0, per_token=False))(embedded)
    assert set(progress) == set(SINK.output(tuple(embedded)))
    assert bool(progress["finished"][0]) and (tmp_path / "f.hdf5").exists()


def test_a_miswired_batch_fails_at_the_boundary_naming_the_stage(sample, tmp_path):
    s = settings(sample)
    routing_only = {c: np.zeros(1, np.int64) for c in ROUTING}
    with pytest.raises(StageInputError, match=r"stage 'decode' got a batch without column\(s\) data, boxes"):
        decode_batch(routing_only, decoder(s))
    with pytest.raises(StageInputError, match=r"stage 'embed' got a batch without column\(s\) data, img, mask"):
        embedder(s)(routing_only)
    unit = Unit(0, 0, Source.TAR, "a.tar")
    sink = Sink(
        [Output(index=0, name="f.hdf5", dir=Location.of(str(tmp_path)), units=(unit,), settings={"x": 1})],
        OutputFormat(dtype="float16", compression=0, per_token=False),
    )
    with pytest.raises(StageInputError, match=r"stage 'sink' got a batch without column\(s\) feat"):
        sink(routing_only)


def documented_columns() -> dict:
    """{column: (stage that adds it, stages that read it)} from ARCHITECTURE.md's table of columns."""
    text = COLUMN_TABLE.read_text()
    table = text[text.index("| column |") :].split("\n\n", 1)[0]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        readers = tuple(re.findall(r"\w+", cells[2]))
        for name in names:
            rows[name] = (cells[1], readers)
    return rows


def test_the_documented_table_of_columns_matches_the_declarations():
    declared = {}
    for stage in STAGES:
        for c in stage.adds:
            declared.setdefault(c, (stage.name, tuple(s.name for s in STAGES if c in s.needs)))
    assert documented_columns() == declared
