"""testing/faults.py: fault injection and cost emulation, inert without the test switch."""

from __future__ import annotations

import os

from conftest import CNN_FLAGS, extract, one_line_error


def test_fault_injection_is_inert_without_the_test_switch(ray_cluster, sample, tmp_path):
    """ILIAS_RAY_FAULT in a production environment does nothing (the run says it ignores it)."""
    env = {k: v for k, v in os.environ.items() if k != "ILIAS_RAY_TESTING"}
    env["ILIAS_RAY_FAULT"] = "sink_write:enospc"  # would fail the run's first write
    address = ray_cluster.get_runtime_context().gcs_address
    p = extract(
        "--dataset_dir",
        str(sample["yfcc"]),
        "--hdf5_dir",
        str(tmp_path),
        "--address",
        address,
        "--partition",
        "distractors",
        *CNN_FLAGS,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ILIAS_RAY_FAULT is ignored" in p.stdout and (tmp_path / "features_distractors_00000.hdf5").exists()


def test_a_malformed_fault_setting_is_one_line_before_ray(sample, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ILIAS_RAY_TESTING", "1")
    monkeypatch.setenv("ILIAS_RAY_FAULT", "embed:explode")
    err = one_line_error(
        ["extract", "--dataset_dir", str(sample["core"]), "--hdf5_dir", str(tmp_path), *CNN_FLAGS], capsys
    )
    assert "ILIAS_RAY_FAULT: 'embed:explode' is not SITE:ACTION" in err


def test_fault_settings_parse_and_slow_sleeps_at_every_hit(monkeypatch):
    """The actions tests use, as parsed; `slow=MS` sleeps at every hit (the runs tests stop part-way)."""
    import time

    from ilias_ray.testing import faults

    assert faults.parse("embed:slow=250, forward:oom>3,assemble:sleep") == [
        ("embed", "slow", 250),
        ("forward", "oom", 3),
        ("assemble", "sleep", 0),
    ]
    monkeypatch.setenv("ILIAS_RAY_FAULT", "embed:slow=150")
    monkeypatch.delenv("ILIAS_RAY_TESTING", raising=False)
    t = time.monotonic()
    faults.hit("embed")  # inert without the test switch
    assert time.monotonic() - t < 0.1
    monkeypatch.setenv("ILIAS_RAY_TESTING", "1")
    t = time.monotonic()
    faults.hit("embed")
    faults.hit("embed")
    faults.hit("forward")  # another site: no sleep
    assert 0.3 <= time.monotonic() - t < 1.5


def test_decode_slow_sleeps_per_image_and_trace_records_each_task(sample, tmp_path, monkeypatch):
    """`decode:slow=MS` costs MS per image decoded, in the decode stage, only with the test switch;
    ILIAS_RAY_TRACE records each decode task (start, end, rows) and each forward pass."""
    import time

    import pyarrow as pa

    from ilias_ray.plan_types import Source, Unit
    from ilias_ray.stages.decode import Decoder, decode_batch
    from ilias_ray.stages.read import read_tar
    from ilias_ray.stages.rows import State
    from ilias_ray.storage.location import Location
    from ilias_ray.testing import faults

    path = sample["yfcc"] / "00000.tar"
    unit = Unit(uid=0, out=0, source=Source.TAR, name=path.name, src=Location.of(str(path)), size=path.stat().st_size)
    table = pa.concat_tables(list(read_tar(unit, None)))
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    images = int((batch["state"] == State.BYTES).sum())
    dec = Decoder("RESIZE_LARGE", 64, 0, False, False)
    monkeypatch.setenv("ILIAS_RAY_FAULT", "decode:slow=100")
    monkeypatch.setenv("ILIAS_RAY_TRACE", str(tmp_path))
    for switch, lo, hi in ((None, 0, 0.05 * images), ("1", 0.1 * images, 0.1 * images + 1.5)):
        if switch:
            monkeypatch.setenv("ILIAS_RAY_TESTING", switch)
        else:
            monkeypatch.delenv("ILIAS_RAY_TESTING", raising=False)
        t = time.monotonic()
        decode_batch(batch, dec)
        assert lo <= time.monotonic() - t < hi
    (event,) = faults.read_trace(tmp_path)  # inert without the switch: one task traced, the second
    assert (
        event["event"] == "decode" and event["rows"] == len(batch["seq"]) and event["t1"] - event["t0"] >= 0.1 * images
    )
