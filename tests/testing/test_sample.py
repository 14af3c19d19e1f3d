import io
import json
import pathlib
import tarfile
import time

import pytest
from PIL import Image, ImageFile, ImageOps

from ilias_ray.testing.sample import EXIF_ORIENTATION_TAG, build_sample, write_selected_ids

IMAGE_EXTS = {".jpg", ".jpeg", ".png"}


def _all_files(root: pathlib.Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(core: pathlib.Path):
    return sorted(p for p in core.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    t0 = time.perf_counter()
    info = build_sample(root)
    info["_elapsed"] = time.perf_counter() - t0
    info["_root"] = root
    return info


def test_deterministic(sample, tmp_path):
    other = build_sample(tmp_path / "again")
    a, b = _all_files(sample["_root"]), _all_files(tmp_path / "again")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == b[k], k

    def strip(d):
        return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("core", "yfcc")}

    assert strip(sample) == strip(other)


def test_different_seed_differs(sample, tmp_path):
    build_sample(tmp_path / "s1", n_instances=2, n_shards=1, per_shard=8, seed=1)
    a = (sample["_root"] / "yfcc" / "00000.tar").read_bytes()
    b = (tmp_path / "s1" / "yfcc" / "00000.tar").read_bytes()
    assert a != b


def test_fast(sample):
    assert sample["_elapsed"] < 3.0


def test_core_layout(sample):
    core = sample["core"]
    assert sample["n_queries"] == 4 and sample["n_texts"] == 4 and sample["n_positives"] == 12
    insts = sorted(p for p in core.iterdir() if p.is_dir())
    assert len(insts) == 4
    non_ascii = [p.name for p in insts if not p.name.isascii()]
    assert non_ascii == ["café_001"]
    exts = []
    for idx, inst in enumerate(sorted(insts, key=lambda p: p.name[-3:])):
        i = int(inst.name.rsplit("_", 1)[1])
        assert i == idx
        q = sorted(x.name for x in (inst / "query").iterdir())
        assert q == sorted([f"Q{i:03d}_00.jpg", f"Q{i:03d}_00_bbox.txt", f"T{i:03d}.txt"])
        text = (inst / "query" / f"T{i:03d}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.count("\n") == 1 and len(text.strip()) > 10
        pos = sorted(x for x in (inst / "pos").iterdir() if x.suffix.lower() in IMAGE_EXTS)
        assert [x.stem for x in pos] == [f"P{i:03d}_{k:02d}" for k in range(3)]
        exts += [x.suffix for x in pos]
    assert exts.count(".png") == 1 and exts.count(".JPG") == 1
    assert "café" in (core / "café_001" / "query" / "T001.txt").read_text(encoding="utf-8")


def test_images_and_boxes(sample):
    core = sample["core"]
    images = _images(core)
    assert len(images) == sample["n_queries"] + sample["n_positives"]
    sizes = set()
    for p in images:
        box = p.with_name(p.stem + "_bbox.txt")
        assert box.is_file(), box
        with Image.open(p) as im:
            im = ImageOps.exif_transpose(im)
            w, h = im.size
            if p.suffix.lower() != ".png":
                assert im.format in (None, "JPEG")
        assert 150 <= min(w, h) and max(w, h) <= 400 and w != h
        assert w % 16 and h % 16
        sizes.add(w > h)
        lines = box.read_text().splitlines()
        assert 1 <= len(lines) <= 2
        for line in lines:
            x, y, bw, bh = map(int, line.split())
            assert x >= 0 and y >= 0 and bw > 0 and bh > 0
            assert x + bw <= w and y + bh <= h
    assert sizes == {True, False}  # both landscape and portrait


def test_exif_orientation(sample):
    core = sample["core"]
    oriented = []
    for p in _images(core):
        with Image.open(p) as im:
            o = im.getexif().get(EXIF_ORIENTATION_TAG)
            if o is not None:
                oriented.append((p, o, im.size))
    assert len(oriented) == 1
    p, o, stored_size = oriented[0]
    assert o == 6
    assert p.parent.name == "query"
    assert p.relative_to(core).as_posix() == sample["exif_query"]
    with Image.open(p) as im:
        upright = ImageOps.exif_transpose(im)
    assert upright.size == stored_size[::-1]


def _members(tar_path):
    with tarfile.open(tar_path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_yfcc_shards(sample):
    yfcc = sample["yfcc"]
    assert sample["n_shards"] == 3
    shards = sorted(p.name for p in yfcc.iterdir())
    assert shards == ["00000.tar", "00001.tar", "00002.tar"]
    ids_with_jpg, all_keys = [], []
    for shard in shards:
        members = _members(yfcc / shard)
        keys = []
        for m, data in members:
            assert m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile()
            key, ext = m.name.split(".", 1)
            assert key.isdigit()
            if not keys or keys[-1][0] != key:
                keys.append((key, []))
            keys[-1][1].append(ext)
            if ext == "json":
                assert json.loads(data) == {"key": key}
        assert len(keys) == 20
        for key, exts in keys:
            assert exts in (["jpg", "json"], ["txt", "json"])
            all_keys.append(key)
            if exts[0] == "jpg":
                ids_with_jpg.append(f"{shard}/{key}")
    assert len(set(all_keys)) == len(all_keys) == 60
    assert ids_with_jpg == sample["distractor_keys"]
    assert len(sample["distractor_keys"]) == 59
    assert len(sample["corrupt_ids"]) == 1 and sample["corrupt_ids"][0].startswith("00000.tar/")
    assert len(sample["nonimage_ids"]) == 1 and sample["nonimage_ids"][0].startswith("00000.tar/")
    assert sample["corrupt_ids"][0] in sample["distractor_keys"]
    assert sample["nonimage_ids"][0] not in sample["distractor_keys"]


@pytest.mark.parametrize("load_truncated", [False, True])
def test_corrupt_member_fails_and_others_decode(sample, load_truncated, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    corrupt = set(sample["corrupt_ids"])
    seen_corrupt = 0
    for shard in sorted(p.name for p in sample["yfcc"].iterdir()):
        for m, data in _members(sample["yfcc"] / shard):
            if not m.name.endswith(".jpg"):
                continue
            sid = f"{shard}/{m.name[:-4]}"
            if sid in corrupt:
                seen_corrupt += 1
                with pytest.raises(Exception):
                    Image.open(io.BytesIO(data)).convert("RGB")
            else:
                im = Image.open(io.BytesIO(data)).convert("RGB")
                assert im.size in {(500, 375), (375, 500), (240, 180), (320, 240), (240, 320)}
    assert seen_corrupt == 1


def test_small_params(tmp_path):
    info = build_sample(tmp_path / "tiny", n_instances=1, n_shards=1, per_shard=2, seed=3)
    assert info["n_queries"] == 1 and info["n_positives"] == 3
    names = [p.name for p in info["core"].iterdir()]
    assert len(names) == 1 and not names[0].isascii()
    assert len(info["distractor_keys"]) == 1
    assert len(info["corrupt_ids"]) == 1 and len(info["nonimage_ids"]) == 1


def test_write_selected_ids(tmp_path):
    p = write_selected_ids(tmp_path / "sub" / "ids.txt", ["00000.tar/1000", "00001.tar/1001000"])
    assert p.read_text(encoding="utf-8") == "00000.tar/1000\n00001.tar/1001000\n"
