"""Data in object storage: inputs read from, and outputs written to, a real S3 server (moto's, on
127.0.0.1), compared row for row with the same runs on local files; resume from the bucket on a
new machine; dropped connections; and one-line errors for what cannot be read."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pyarrow.fs as pafs
import pytest

from conftest import EXTRACT, VIT, extract, kill_run_flags, one_line_error, slowed
from ilias_ray.cli import main as cli
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.job.run import run
from ilias_ray.stages.rows import UnitEnd
from ilias_ray.storage.credentials import redact
from ilias_ray.storage.location import Location, child
from ilias_ray.testing.s3 import CuttingProxy, deny_reads, endpoint_query, listing, make_bucket, upload

SMALL = dict(model=VIT, pretrained=False, resolution=64, batch_size=8, webdl_batch_size=8)


@pytest.fixture(scope="module")
def bucket(s3_server, sample, tmp_path_factory):
    """The sample uploaded to s3://ilias-in: core/, yfcc/ and an ID list."""
    make_bucket("ilias-in")
    upload(sample["core"], "ilias-in/core")
    upload(sample["yfcc"], "ilias-in/yfcc")
    lists = tmp_path_factory.mktemp("lists")
    ids = lists / "keys.txt"
    ids.write_text("\n".join(k.split("/")[1] for k in sample["distractor_keys"][2:30:3]) + "\n")
    upload(ids, "ilias-in/lists/keys.txt")
    files = sorted(p.relative_to(sample["core"]).as_posix() for p in sample["core"].rglob("*.jpg"))
    uned = lists / "uned.txt"
    uned.write_text("\n".join(files[::-3]) + "\n", encoding="utf-8")  # not sorted, non-ASCII names included
    upload(uned, "ilias-in/lists/uned.txt")
    return {
        "core": "s3://ilias-in/core",
        "yfcc": "s3://ilias-in/yfcc",
        "keys": "s3://ilias-in/lists/keys.txt",
        "keys_local": str(ids),
        "uned": "s3://ilias-in/lists/uned.txt",
        "uned_local": str(uned),
    }


def read(path_or_loc) -> dict:
    loc = path_or_loc if isinstance(path_or_loc, Location) else Location.of(str(path_or_loc))
    with loc.open_hdf5() as f:
        return {
            "index": list(f["index"].asstr()[()]),
            "features": f["features"][()],
            "skipped": list(f["skipped_index"].asstr()[()]),
            "reasons": list(f["skipped_reason"].asstr()[()]),
            "attrs": {k: f.attrs[k] for k in f.attrs},
        }


def assert_same_rows(a: dict, b: dict) -> None:
    assert a["index"] == b["index"] and a["skipped"] == b["skipped"] and a["reasons"] == b["reasons"]
    np.testing.assert_array_equal(a["features"], b["features"])  # same bytes in, same numbers out


RUNS = {  # partition -> (dataset key, extra options, --selected_ids key or None)
    "image_queries": ("core", dict(masking=True), None),
    "positives": ("core", dict(crop_resize=True), None),
    "text_queries": ("core", dict(framework="text", model="RN50.openai", pretrained=False), None),
    "distractors": ("yfcc", dict(tar_batch_size=2), None),
    "uned": ("core", {}, "uned"),
}


@pytest.mark.parametrize("partition", list(RUNS))
def test_each_partition_from_a_bucket_equals_local_files(ray_cluster, sample, bucket, tmp_path, partition):
    """Inputs in the bucket, outputs in another bucket: the files equal a run on local copies."""
    key, opts, ids = RUNS[partition]
    opts = dict(SMALL, **opts)
    local = run(
        Config(
            dataset_dir=str(sample[key]),
            hdf5_dir=str(tmp_path),
            partition=partition,
            selected_ids=bucket[f"{ids}_local"] if ids else None,
            **opts,
        )
    )
    make_bucket(f"out-{partition.replace('_', '-')}")
    out = f"s3://out-{partition.replace('_', '-')}/features"
    remote = run(
        Config(
            dataset_dir=bucket[key],
            hdf5_dir=out,
            partition=partition,
            selected_ids=bucket[ids] if ids else None,
            **opts,
        )
    )
    assert remote["written"] == local["written"] and remote["rows"] == local["rows"] > 0
    for name in local["written"]:
        assert_same_rows(read(Location.of(out) / name), read(tmp_path / name))
    assert listing(out[5:]) == sorted(local["written"])  # no parts, no staging leftovers in the bucket


def test_ids_and_checkpoint_from_a_bucket(ray_cluster, sample, bucket, vit_checkpoint, tmp_path):
    """--selected_ids and --checkpoint as URIs: the same file as with local copies."""
    ckpt = upload(vit_checkpoint, "ilias-in/weights/vit.safetensors")
    opts = dict(SMALL, pretrained=True, partition="distractors")
    run(
        Config(
            dataset_dir=str(sample["yfcc"]),
            hdf5_dir=str(tmp_path / "a"),
            checkpoint=str(vit_checkpoint),
            selected_ids=bucket["keys_local"],
            **opts,
        )
    )
    run(
        Config(
            dataset_dir=bucket["yfcc"],
            hdf5_dir=str(tmp_path / "b"),
            checkpoint=ckpt,
            selected_ids=bucket["keys"],
            **opts,
        )
    )
    name = "features_distractors_00000.hdf5"
    a, b = read(tmp_path / "a" / name), read(tmp_path / "b" / name)
    assert_same_rows(a, b)
    assert len(a["index"]) + len(a["skipped"]) == 10
    # The same settings fingerprint: the digests of the ID list and the weights, not their names.
    assert a["attrs"]["fingerprint"] == b["attrs"]["fingerprint"]


def test_outputs_in_a_bucket_verify_rerun_and_refuse(ray_cluster, sample, bucket, capsys):
    make_bucket("out-verify")
    out = "s3://out-verify/run1"
    opts = dict(SMALL, partition="distractors", tar_batch_size=2)
    s = run(Config(dataset_dir=bucket["yfcc"], hdf5_dir=out, **opts))
    assert s["written"] == ["features_distractors_00000.hdf5", "features_distractors_00001.hdf5"]
    printed = capsys.readouterr().out
    assert cli.main(["verify", "--hdf5_dir", out]) == 0
    said = capsys.readouterr().out
    assert "verify: 2 file(s), 0 problem(s), 0 warning(s)" in said, said
    # No credential in the progress lines, the summary or the files' attributes.
    attrs = read(Location.of(out) / s["written"][0])["attrs"]
    assert attrs["complete"] and "s3://ilias-in/yfcc" in attrs["run"]
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]):
        assert secret not in printed + said and not any(secret in str(v) for v in attrs.values())
    # A rerun reads the fingerprint from the objects: same settings skip, others are refused.
    s = run(Config(dataset_dir=bucket["yfcc"], hdf5_dir=out, **opts))
    assert s["written"] == [] and len(s["already_done"]) == 2
    with pytest.raises(UserError, match="resolution: 64 -> 96"):
        run(Config(dataset_dir=bucket["yfcc"], hdf5_dir=out, **dict(opts, resolution=96)))
    s = run(Config(dataset_dir=bucket["yfcc"], hdf5_dir=out, overwrite=True, **dict(opts, resolution=96)))
    assert len(s["written"]) == 2
    assert read(Location.of(out) / "features_distractors_00000.hdf5")["attrs"]["complete"]


def test_a_killed_run_resumes_from_the_bucket_on_a_new_machine(ray_cluster, sample, bucket, tmp_path, uninterrupted):
    """SIGKILL once a shard is durable in the bucket; the rerun, with an empty staging folder (a new
    head node), redoes only the other shards and gives the uninterrupted run's file."""
    make_bucket("out-resume")
    out = "s3://out-resume/f"
    args = kill_run_flags(ray_cluster, bucket["yfcc"], out)
    first = slowed(1000, dict(os.environ, ILIAS_RAY_STAGING_DIR=str(tmp_path / "staging1")))  # stopped part-way
    proc = subprocess.Popen(
        EXTRACT + args,
        env=first,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    parts = "out-resume/f/features_distractors_00000.hdf5.parts"
    deadline = time.time() + 240
    while not any(n.endswith(".json") and n[0].isdigit() for n in listing(parts)) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [n for n in listing(parts) if n.endswith(".json") and n[0].isdigit()]
    assert 1 <= len(done) < 3 and "features_distractors_00000.hdf5" not in listing("out-resume/f")
    shutil.rmtree(tmp_path / "staging1")  # the head node is gone
    second = dict(os.environ, ILIAS_RAY_STAGING_DIR=str(tmp_path / "staging2"))
    p = extract(*args, env=second)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming: {len(done)} of 3 unit(s) already done" in p.stdout
    name = uninterrupted.name
    got, want = read(Location.of(out) / name), read(uninterrupted)
    assert got["index"] == want["index"] and got["skipped"] == want["skipped"]
    np.testing.assert_allclose(got["features"].astype(np.float32), want["features"].astype(np.float32), atol=1e-3)
    assert listing("out-resume/f") == [name]


def test_connections_cut_mid_transfer(ray_cluster, s3_server, sample, bucket, tmp_path, capsys):
    """A proxy of the test's own between the job and the server resets connections part-way through
    responses. The run completes with every row exactly once, or fails with one line and a rerun
    completes; either way the file equals the run on local files."""
    opts = dict(SMALL, partition="distractors")
    run(Config(dataset_dir=str(sample["yfcc"]), hdf5_dir=str(tmp_path / "ref"), **opts))
    # 16 resets of responses past 20 KiB (shard reads). The S3 client retries a reset request itself for
    # about 6 s; the two tests below take ilias-ray's own retries past that.
    proxy = CuttingProxy(s3_server, cuts=16, after=20 << 10)
    try:
        via = endpoint_query(proxy.port)
        make_bucket("out-cut")
        cfg = dict(dataset_dir=bucket["yfcc"] + via, hdf5_dir="s3://out-cut/f" + via, **opts)
        try:
            s = run(Config(**cfg))
        except UserError as e:  # retries exhausted: one line, then a rerun finishes the job
            assert "\n" not in str(e) and "cannot" in str(e)
            s = run(Config(**cfg))
        assert proxy.cut == 16  # the faults did happen
    finally:
        proxy.close()
    name = "features_distractors_00000.hdf5"
    assert s["written"] == [name] or s["already_done"] == [name]
    got, want = read(Location.of("s3://out-cut/f") / name), read(tmp_path / "ref" / name)
    assert len(got["index"]) == len(set(got["index"]))
    assert_same_rows(got, want)


def test_gcs_and_other_uris_go_through_the_same_layer(tmp_path, monkeypatch):
    """No GCS server installs from PyPI: gs:// is checked at the URI and filesystem-selection level."""
    import pickle

    gcs = Location.of("gs://my-bucket/ilias/images")
    assert type(gcs.fs) is pafs.GcsFileSystem and gcs.path == "my-bucket/ilias/images" and not gcs.local
    assert str(gcs / "sub/a.jpg") == "gs://my-bucket/ilias/images/sub/a.jpg" and (gcs / "sub/a.jpg").name == "a.jpg"
    s3 = Location.of("s3://b/p?endpoint_override=127.0.0.1:9&scheme=http") / "x.tar"
    assert type(s3.fs) is pafs.S3FileSystem and s3.path == "b/p/x.tar" and str(s3) == "s3://b/p/x.tar"
    assert Location.of(f"file://{tmp_path}").local and Location.of("rel/dir").base == os.path.abspath("rel/dir")
    # A sweep's per-model folders: the name goes into the path, not after the query.
    assert child("s3://b/p/?endpoint_override=h:1", "SigLIP") == "s3://b/p/SigLIP?endpoint_override=h:1"
    assert child("/data/out/", "SigLIP") == "/data/out/SigLIP"
    again = pickle.loads(pickle.dumps(gcs / "x"))  # read tasks carry locations as two strings
    assert again == gcs / "x" and type(again.fs) is pafs.GcsFileSystem
    monkeypatch.setenv("ILIAS_RAY_STAGING_DIR", str(tmp_path / "stage"))
    assert gcs.staging().startswith(str(tmp_path / "stage")) and Location.of(str(tmp_path)).staging() == str(tmp_path)
    with pytest.raises(UserError, match="credentials in a URI are not accepted"):
        Config(dataset_dir="gs://user:pw@my-bucket/x", hdf5_dir=str(tmp_path)).validate()
    assert (
        redact("s3://AK:SECRET@b/p?region=x&secret_key=abc&session_token=t")
        == "s3://b/p?region=x&secret_key=***&session_token=***"
    )
    # The job forwards the endpoint and region to its workers, never a key.
    from ilias_ray.job.session import FORWARDED_ENV

    assert not [k for k in FORWARDED_ENV if re.search("KEY|SECRET|TOKEN|PASSWORD", k)]


def read_rows(src: str, name: str) -> list:
    """Every row one read task makes of a shard, without Ray."""
    import pyarrow as pa

    from ilias_ray.plan_types import Source, Unit
    from ilias_ray.stages.read import read_tar

    loc = Location.of(src) / name
    unit = Unit(uid=1, out=0, source=Source.TAR, name=name, src=loc, size=loc.info().size)
    return pa.concat_tables(list(read_tar(unit, None))).to_pylist()


def test_a_shard_that_breaks_part_way_is_read_again_and_no_row_is_sent_twice(s3_server, sample, bucket, monkeypatch):
    """Small ranges, one try per range, and more cuts in a row than the S3 client's own retries
    (about 6 s of them): the read fails part-way after rows went out, and the shard is read again
    from its start. Every position comes out once, with the bytes of the local read."""
    from ilias_ray.storage import ranged, retry

    monkeypatch.setattr(ranged, "CHUNK", 32 << 10)
    monkeypatch.setattr(retry, "ATTEMPTS", 1)
    want = read_rows(str(sample["yfcc"]), "00001.tar")
    proxy = CuttingProxy(s3_server, cuts=80, after=8 << 10, spare=8)  # two requests in flight share them
    try:
        got = read_rows(bucket["yfcc"] + endpoint_query(proxy.port), "00001.tar")
    finally:
        proxy.close()
    assert proxy.cut == 80
    assert [r["pos"] for r in got] == [r["pos"] for r in want] == list(range(len(want)))
    assert [(r["id"], r["state"], r["data"]) for r in got] == [(r["id"], r["state"], r["data"]) for r in want]
    assert UnitEnd.of(got[-1]["unit_end"]).retries >= 1 and UnitEnd.of(want[-1]["unit_end"]).retries == 0


def test_a_read_that_keeps_failing_is_one_line_that_names_the_shard(s3_server, bucket, monkeypatch):
    from ilias_ray.stages import read
    from ilias_ray.storage import ranged, retry

    monkeypatch.setattr(retry, "ATTEMPTS", 1)
    monkeypatch.setattr(ranged, "AHEAD", 0)  # one request at a time: one failure of the S3 client's own ~6 s
    monkeypatch.setattr(read, "SHARD_ATTEMPTS", 1)
    proxy = CuttingProxy(s3_server, cuts=1000, after=8 << 10)
    try:
        with pytest.raises(UserError) as e:
            read_rows(bucket["yfcc"] + endpoint_query(proxy.port), "00002.tar")
    finally:
        proxy.close()
    msg = str(e.value)
    assert msg.startswith("cannot read s3://ilias-in/yfcc/00002.tar: ") and "\n" not in msg
    assert "finished shards are kept" in msg


def test_a_missing_or_unreadable_local_shard_is_an_error_not_data(ray_cluster, sample, tmp_path):
    """The rule is the same for local files: a shard the plan saw but cannot be read fails the run
    with one line; it never becomes "not a tar" with 0 rows."""
    shards = tmp_path / "yfcc"
    shutil.copytree(sample["yfcc"], shards)
    (shards / "00003.tar").symlink_to(tmp_path / "gone.tar")  # a broken link
    with pytest.raises(UserError, match=r"cannot read .*00003.tar: not found"):
        run(Config(dataset_dir=str(shards), hdf5_dir=str(tmp_path / "out"), partition="distractors", **SMALL))
    # Gone between the plan and the read task.
    unit_src = str(shards)
    os.remove(shards / "00003.tar")
    size = (shards / "00001.tar").stat().st_size
    os.remove(shards / "00001.tar")
    from ilias_ray.plan_types import Source, Unit
    from ilias_ray.stages.read import read_tar

    unit = Unit(uid=1, out=0, source=Source.TAR, name="00001.tar", src=Location.of(unit_src) / "00001.tar", size=size)
    with pytest.raises(UserError, match=r"cannot read .*00001.tar: not found.*finished shards are kept"):
        list(read_tar(unit, None))


def test_missing_bucket_prefix_and_denied_reads_are_one_line_before_ray(s3_server, sample, bucket, tmp_path, capsys):
    base = ["extract", "--model", "resnet18", "--pretrained", "false", "--hdf5_dir", str(tmp_path / "out")]
    err = one_line_error(base + ["--dataset_dir", "s3://no-such-bucket/core"], capsys)
    assert "s3://no-such-bucket/core" in err and "bucket 'no-such-bucket' does not exist" in err
    err = one_line_error(base + ["--dataset_dir", "s3://ilias-in/no/such/prefix"], capsys)
    assert "s3://ilias-in/no/such/prefix" in err and "no objects under this prefix" in err
    err = one_line_error(
        base
        + ["--dataset_dir", bucket["core"], "--selected_ids", "s3://ilias-in/lists/nope.txt", "--partition", "uned"],
        capsys,
    )
    assert "--selected_ids s3://ilias-in/lists/nope.txt: no such file" in err
    make_bucket("ilias-denied")
    shard = sample["yfcc"] / "00000.tar"
    upload(shard, f"ilias-denied/yfcc/{shard.name}")
    deny_reads("ilias-denied")
    err = one_line_error(base + ["--dataset_dir", "s3://ilias-denied/yfcc", "--partition", "distractors"], capsys)
    assert f"cannot read s3://ilias-denied/yfcc/{shard.name}: access denied" in err
    err = one_line_error(
        [
            "extract",
            "--model",
            "resnet18",
            "--pretrained",
            "false",
            "--dataset_dir",
            bucket["core"],
            "--hdf5_dir",
            "s3://no-such-out-bucket/features",
        ],
        capsys,
    )
    assert "--hdf5_dir s3://no-such-out-bucket/features is not writable" in err
    # Credentials are never taken as flags, and never echoed.
    err = one_line_error(base + ["--dataset_dir", "s3://AKEY:hunter2-secret@ilias-in/core"], capsys)
    assert "credentials in a URI are not accepted" in err and "hunter2" not in err and "AKEY" not in err
    err = one_line_error(base + ["--dataset_dir", "s3://ilias-in/core?secret_key=hunter2-secret"], capsys)
    assert "hunter2" not in err
