"""Hostile inputs: bad images are skipped and recorded, odd but valid ones embedded, bad shards keep
what came before, and bad folders, files and flags give one readable line before Ray starts."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from conftest import one_line_error
from ilias_ray.config import Config
from ilias_ray.job.run import run
from ilias_ray.output.verify import verify

ROOT = Path(__file__).resolve().parents[2]


CLI = [sys.executable, "-m", "ilias_ray"]


CNN = dict(model="resnet18", pretrained=False, resolution=64, batch_size=8, webdl_batch_size=8)


def photo(w: int, h: int, mode: str = "RGB") -> Image.Image:
    img = Image.fromarray(skdata.astronaut()).resize((w, h))
    return img.convert(mode)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format=fmt, **kw)
    return b.getvalue()


def bomb_jpeg(side: int = 20000) -> bytes:
    """A small valid JPEG whose header claims side x side pixels (20000: over twice Pillow's limit;
    10000: over it, where Pillow itself only warns)."""
    raw = bytearray(encoded(photo(32, 24), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = side.to_bytes(2, "big") + side.to_bytes(2, "big")
    return bytes(raw)


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"newpath 0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"
)  # Pillow would run Ghostscript


def png16() -> bytes:
    a = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    return encoded(Image.fromarray(a), "PNG")


BAD = {  # member key -> the reason's telltale
    "random": "UnidentifiedImageError",
    "empty": "UnidentifiedImageError",
    "halfjpeg": "truncated",
    "bomb": "DecompressionBombError",
    "bomb1x": "DecompressionBombError",
    "eps": "UnidentifiedImageError",
}


def hostile_members() -> list:
    jpg = encoded(photo(64, 48), "JPEG", quality=90)
    odd = [
        ("good", jpg),
        ("random", np.random.RandomState(0).bytes(3000)),
        ("empty", b""),
        ("halfjpeg", jpg[: len(jpg) // 2]),
        ("bomb", bomb_jpeg()),
        ("bomb1x", bomb_jpeg(10000)),
        ("eps", EPS),
        ("pngpayload", encoded(photo(40, 30), "PNG")),
        ("webppayload", encoded(photo(40, 30), "WEBP")),
        ("onepixel", encoded(photo(1, 1), "JPEG")),
        ("wide", encoded(photo(20000, 200), "JPEG", quality=75)),
        ("tall", encoded(photo(1, 50000), "PNG")),  # RESIZE_LARGE makes it 1x64: embedded
        ("png16", png16()),
        ("palette", encoded(photo(40, 30).convert("P"), "PNG")),
        ("rgba", encoded(photo(40, 30, "RGBA"), "PNG")),
        ("cmyk", encoded(photo(40, 30, "CMYK"), "JPEG")),
        ("gray", encoded(photo(40, 30, "L"), "JPEG")),
        ("ünï_日本", jpg),  # non-ASCII member name
        ("../../escape", jpg),  # never a file system path
        ("/abs/evil", jpg),
        ("dup", jpg),
        ("dup", encoded(photo(30, 40), "JPEG")),  # the same key twice in a row
        ("late", jpg),
        ("between", jpg),
        ("late", jpg),  # and again further on
    ]
    return odd


def write_tar(path: Path, members: list) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, data in members:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    shards = root / "shards"
    shards.mkdir()
    write_tar(shards / "hostile.tar", hostile_members())
    # A shard cut in the middle of its third member: the first two are kept.
    full = root / "full.tar"
    write_tar(full, [(f"k{i}", encoded(photo(60, 45), "JPEG", quality=95)) for i in range(5)])
    with tarfile.open(full) as tf:
        third = tf.getmembers()[2]
    data = full.read_bytes()
    (shards / "cut.tar").write_bytes(data[: third.offset_data + third.size // 2])
    (shards / "junk.tar").write_bytes(b"not a tar at all " * 64)
    write_tar(shards / "empty.tar", [])
    (shards / "zero.tar").write_bytes(b"")
    out = root / "out"
    summary = run(Config(dataset_dir=str(shards), hdf5_dir=str(out), partition="distractors", **CNN))
    return {"root": root, "out": out, "file": out / "features_distractors_00000.hdf5", "summary": summary}


def read(path):
    with h5py.File(path) as f:
        return {
            "index": list(f["index"].asstr()[()]),
            "features": f["features"][()].astype(np.float32),
            "skipped": dict(zip(f["skipped_index"].asstr()[()], f["skipped_reason"].asstr()[()])),
            "duplicates": list(f["duplicate_index"].asstr()[()]),
            "units": json.loads(f.attrs["units"]),
        }


def test_bad_images_are_skipped_with_reasons_and_odd_ones_embedded(hostile):
    got = read(hostile["file"])
    skipped = {k.split("/", 1)[1]: v for k, v in got["skipped"].items() if k.startswith("hostile.tar/")}
    assert set(skipped) == set(BAD)
    for key, telltale in BAD.items():
        assert skipped[key].startswith("decode failed") and telltale in skipped[key], (key, skipped[key])
    mine = [i for i in got["index"] if i.startswith("hostile.tar/")]
    members = hostile_members()
    # Every other member has its row, in member order (both occurrences of a repeated key).
    assert len(mine) == len(members) - len(BAD)
    assert all(i.isascii() for i in mine)
    assert "hostile.tar/#U00fcn#U00ef_#U65e5#U672c" in mine  # unicode-escape, \\u -> #U, \\x -> #U00
    assert mine[:3] == ["hostile.tar/good", "hostile.tar/pngpayload", "hostile.tar/webppayload"]
    assert mine.count("hostile.tar/dup") == 2 and mine.count("hostile.tar/late") == 2
    assert got["duplicates"] == ["hostile.tar/dup", "hostile.tar/late"]
    rows = [i for i, x in enumerate(got["index"]) if x.startswith("hostile.tar/")]
    feats = got["features"][rows]
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-2)
    # Member names were never used as paths.
    assert not list(hostile["root"].parent.rglob("escape*")) and not Path("/abs/evil.jpg").exists()


def test_bad_shards_keep_what_came_before(hostile):
    got = read(hostile["file"])
    ends = {u["name"]: u for u in got["units"]}
    assert list(ends) == ["cut.tar", "empty.tar", "hostile.tar", "junk.tar", "zero.tar"]
    assert ends["cut.tar"]["end"].startswith("truncated") and ends["cut.tar"]["rows"] == 3
    assert [i for i in got["index"] if i.startswith("cut.tar/")] == ["cut.tar/k0", "cut.tar/k1"]
    assert got["skipped"]["cut.tar/k2"] == "shard truncated inside this sample"
    assert ends["junk.tar"]["end"].startswith("not a tar") and ends["junk.tar"]["rows"] == 0
    assert ends["zero.tar"]["end"].startswith("not a tar") and ends["zero.tar"]["rows"] == 0
    assert ends["empty.tar"] == {"name": "empty.tar", "rows": 0, "end": "eof"}
    s = hostile["summary"]
    assert s["truncated_shards"] == 3 and s["repeated_ids"] == 2


def test_verify_passes_with_the_inputs_duplicates_as_warnings(hostile, capsys):
    assert verify(str(hostile["out"])) == 0
    out = capsys.readouterr().out
    assert "features_distractors_00000.hdf5" in out and "ok" in out
    assert "warning:" in out and "repeated as in the input" in out and "0 problem(s)" in out


def test_bad_folders_files_and_flags_fail_in_one_line_before_ray(sample, tmp_path, capsys):
    # As a real process too: one line on stderr, exit status 2, no traceback.
    p = subprocess.run(
        CLI + ["extract", "--dataset_dir", str(tmp_path / "missing"), "--hdf5_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is not a directory" in p.stderr
    check = lambda args: one_line_error(args, capsys)  # noqa: E731
    core = sample["core"]
    query = next(p for p in sorted(core.rglob("*.jpg")) if "quer" in str(p) and str(p).isascii())
    base = ["extract", "--hdf5_dir", str(tmp_path / "out"), "--model", "resnet18", "--pretrained", "false"]
    assert "is not a directory" in check(base + ["--dataset_dir", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no inputs for --partition positives" in check(
        base + ["--dataset_dir", str(empty), "--partition", "positives"]
    )
    # One query without its box file, one with a malformed one.
    for name, box in (("nobox", None), ("badbox", "12 x 30\n")):
        d = tmp_path / name / "query"
        d.mkdir(parents=True)
        shutil.copy(query, d / "q.jpg")
        if box is not None:
            (d / "q_bbox.txt").write_text(box)
        err = check(base + ["--dataset_dir", str(tmp_path / name), "--masking", "true"])
        assert "q_bbox.txt" in err and ("No such file" in err if box is None else "malformed" in err)
    listed = tmp_path / "ids.txt"
    rel = query.relative_to(core).as_posix()
    listed.write_text(f"{rel}\nnot/there.jpg\n")
    err = check(base + ["--dataset_dir", str(core), "--partition", "uned", "--selected_ids", str(listed)])
    assert "1 listed file(s) not found" in err and "not/there.jpg" in err and "--skip_missing true" in err
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "--hdf5_dir" in check(["extract", "--dataset_dir", str(core), "--hdf5_dir", str(a_file / "sub")] + base[3:])
    for flag, value in (
        ("--resolution", "0"),
        ("--batch_size", "-1"),
        ("--multiscale", "perhaps"),
        ("--partition", "everything"),
        ("--hdf5_compression", "12"),
        ("--start_tar", "x"),
    ):
        assert flag in check(base + ["--dataset_dir", str(core), flag, value])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_skip_missing_records_the_missing_files(ray_cluster, sample, tmp_path):
    query = next(p for p in sorted(sample["core"].rglob("*.jpg")) if "quer" in str(p) and str(p).isascii())
    rel = query.relative_to(sample["core"]).as_posix()
    listed = tmp_path / "ids.txt"
    listed.write_text(f"not/there.jpg\n{rel}\n")
    run(
        Config(
            dataset_dir=str(sample["core"]),
            hdf5_dir=str(tmp_path),
            partition="uned",
            selected_ids=str(listed),
            skip_missing=True,
            **CNN,
        )
    )
    got = read(tmp_path / "features_uned.hdf5")
    assert got["index"] == [rel] and got["skipped"] == {"not/there.jpg": "file not found"}
