"""End-to-end: real local Ray, real tars and JPEGs, real timm/open_clip models, real HDF5 files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file

from conftest import VIT
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.job.run import run
from ilias_ray.output.verify import verify

IMAGE_EXTS = ("jpg", "jpeg", "png", "JPG", "JPEG", "PNG")


def extract(out, dataset_dir, **kw) -> dict:
    kw.setdefault("model", VIT)
    kw.setdefault("resolution", 64)
    cfg = Config(dataset_dir=str(dataset_dir), hdf5_dir=str(out), **kw)
    return run(cfg)


def read(path):
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in f}
        out["index"] = list(f["index"].asstr()[()])
        out["skipped_index"] = list(f["skipped_index"].asstr()[()])
        out["skipped_reason"] = list(f["skipped_reason"].asstr()[()])
        out["attrs"] = dict(f.attrs)
        out["dtypes"] = {k: f[k].dtype for k in f}
    return out


def expected_ids(core: Path, key: str) -> list:
    """Independent listing: relative paths with an image extension containing `key`, sorted, escaped."""
    rel = []
    for dirpath, _, files in os.walk(core):
        for name in files:
            if name.rsplit(".", 1)[-1] in IMAGE_EXTS:
                r = os.path.relpath(os.path.join(dirpath, name), core)
                if key in r:
                    rel.append(r)
    return [r.replace("é", "#U00e9") for r in sorted(rel)]


def direct_vit_feature(ckpt: Path, image_path: Path, res: int, exif: bool = True) -> np.ndarray:
    """The spec's recipe written out by hand for one image and a ViT (patch 16)."""
    model = timm.create_model(VIT, pretrained=False, num_classes=0, dynamic_img_size=True).eval()
    sd = {k: v for k, v in load_file(str(ckpt)).items() if not k.startswith("head.")}
    model.load_state_dict(sd)
    img = Image.open(image_path).convert("RGB")
    if exif:
        img = ImageOps.exif_transpose(img)
    w, h = img.size
    ar = h / w
    size = (res, int(res * ar)) if ar <= 1 else (int(res / ar), res)
    img = img.resize(size, Image.BICUBIC)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(model.pretrained_cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(model.pretrained_cfg["std"]).view(3, 1, 1)
    x = (x - mean) / std
    ph, pw = (-x.shape[1]) % 16, (-x.shape[2]) % 16
    x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    with torch.no_grad():
        f = model(x[None])
    return F.normalize(f, dim=-1)[0].numpy()


def test_image_partitions_in_one_job_contract_and_parity(ray_cluster, sample, vit_checkpoint, tmp_path, capsys):
    """image_queries, positives and distractors as one job (one dataset, one model pool): each
    partition gets the files that a run of it alone writes, with the features of the spec."""
    core = sample["core"]
    s = extract(
        tmp_path,
        core,
        partition="image_queries,positives,distractors",
        distractors_dir=str(sample["yfcc"]),
        tar_batch_size=2,
        checkpoint=str(vit_checkpoint),
    )
    chunks = ["features_distractors_00000.hdf5", "features_distractors_00001.hdf5"]
    assert s["written"] == ["features_image_queries.hdf5", "features_positives.hdf5", *chunks]
    assert capsys.readouterr().out.count("extracting 4 file(s) with timm:") == 1  # one dataset, one pool
    for part, key in (("image_queries", "quer"), ("positives", "pos")):
        path = tmp_path / f"features_{part}.hdf5"
        d = read(path)
        assert d["index"] == expected_ids(core, key)
        assert d["features"].dtype == np.float16 and d["features"].shape == (len(d["index"]), 192)
        assert h5py.check_string_dtype(d["dtypes"]["index"]).encoding == "ascii"
        np.testing.assert_allclose(np.linalg.norm(d["features"].astype(np.float32), axis=1), 1, atol=2e-3)
        assert d["attrs"]["complete"] and d["attrs"]["num_rows"] == len(d["index"])
        assert not (tmp_path / (path.name + ".partial")).exists()
        assert json.loads(d["attrs"]["ilias_ray_settings"])["partition"] == part
        assert json.loads(d["attrs"]["run"])["dataset_dir"] == str(core)
    # The non-ASCII instance folder is escaped; EXIF orientation is applied for folder images.
    assert any(i.startswith("caf#U00e9_001/") for i in read(tmp_path / "features_positives.hdf5")["index"])
    d = read(tmp_path / "features_image_queries.hdf5")
    for i, id_ in enumerate(d["index"]):
        raw = id_.replace("#U00e9", "é")
        want = direct_vit_feature(vit_checkpoint, core / raw, 64)
        np.testing.assert_allclose(d["features"][i].astype(np.float32), want, atol=2e-3)

    a = read(tmp_path / chunks[0])
    b = read(tmp_path / chunks[1])
    assert json.loads(a["attrs"]["run"])["dataset_dir"] == str(sample["yfcc"])  # verify counts shards there
    good = [k for k in sample["distractor_keys"] if k not in sample["corrupt_ids"]]
    assert a["index"] + b["index"] == good  # shard order, then member order
    assert all(i.startswith(("00000.tar/", "00001.tar/")) for i in a["index"])
    skipped = dict(zip(a["skipped_index"], a["skipped_reason"]))
    assert set(skipped) == set(sample["corrupt_ids"]) | set(sample["nonimage_ids"])
    assert all("decode failed" in skipped[i] for i in sample["corrupt_ids"])
    assert all("no jpg" in skipped[i] for i in sample["nonimage_ids"])
    assert a["attrs"]["num_skipped"] == len(skipped)
    # Tar images are not EXIF-transposed; check one against the hand-written recipe.
    import io
    import tarfile

    with tarfile.open(sample["yfcc"] / "00002.tar") as tf:
        key = b["index"][0].split("/")[1]
        data = tf.extractfile(f"{key}.jpg").read()
    img_path = tmp_path / "one.jpg"
    img_path.write_bytes(data)
    want = direct_vit_feature(vit_checkpoint, img_path, 64, exif=False)
    np.testing.assert_allclose(b["features"][0].astype(np.float32), want, atol=2e-3)
    assert Image.open(io.BytesIO(data)).size  # a real JPEG
    assert verify(str(tmp_path), out=lambda *_: None) == 0

    # A run of one partition alone finds the files of the joint run complete (same fingerprint)...
    for part in ("image_queries", "positives"):
        s = extract(tmp_path, core, partition=part, checkpoint=str(vit_checkpoint))
        assert s["already_done"] == [f"features_{part}.hdf5"] and s["written"] == []
    # ... and writes what it would: --start_tar selects shards[S:S+T] and numbers the chunk S // B.
    out2 = tmp_path / "second"
    s = extract(
        out2, sample["yfcc"], partition="distractors", tar_batch_size=2, start_tar=2, checkpoint=str(vit_checkpoint)
    )
    assert s["written"] == ["features_distractors_00001.hdf5"]
    np.testing.assert_array_equal(read(out2 / "features_distractors_00001.hdf5")["features"], b["features"])
    assert read(out2 / chunks[1])["attrs"]["fingerprint"] == b["attrs"]["fingerprint"]


def test_checkpoint_pth_equals_safetensors(ray_cluster, sample, vit_checkpoint, tmp_path):
    """A timm state_dict as .pth (read with weights_only=True) gives the same features."""
    pth = tmp_path / "vit.pth"
    torch.save(load_file(str(vit_checkpoint)), pth)
    extract(tmp_path / "st", sample["core"], partition="image_queries", checkpoint=str(vit_checkpoint))
    extract(tmp_path / "pt", sample["core"], partition="image_queries", checkpoint=str(pth))
    a = read(tmp_path / "st" / "features_image_queries.hdf5")["features"]
    b = read(tmp_path / "pt" / "features_image_queries.hdf5")["features"]
    np.testing.assert_array_equal(a, b)


def test_same_rows_whatever_batching_actors_and_sinks(ray_cluster, sample, tmp_path, capsys):
    base = dict(partition="distractors", pretrained=False)
    extract(tmp_path / "a", sample["yfcc"], batch_size=64, webdl_batch_size=64, tar_batch_size=10, **base)
    # One output file per shard, written by two sink actors (output o by sink o mod 2).
    s = extract(
        tmp_path / "b",
        sample["yfcc"],
        batch_size=1,
        webdl_batch_size=5,
        model_actors=2,
        num_workers=1,
        tar_batch_size=1,
        sinks=2,
        **base,
    )
    assert "2 sink(s)" in capsys.readouterr().out and len(s["written"]) == len(list(sample["yfcc"].glob("*.tar"))) > 2
    a = read(tmp_path / "a" / "features_distractors_00000.hdf5")
    b = [read(tmp_path / "b" / name) for name in s["written"]]
    assert a["index"] == sum((d["index"] for d in b), []) and len(a["index"]) == len(set(a["index"]))
    assert a["skipped_index"] == sum((d["skipped_index"] for d in b), [])
    b_features = np.concatenate([d["features"] for d in b]).astype(np.float32)
    np.testing.assert_allclose(a["features"].astype(np.float32), b_features, atol=1e-3)


def test_text_queries(ray_cluster, sample, tmp_path):
    import open_clip

    extract(tmp_path, sample["core"], partition="text_queries", framework="text", model="RN50.openai", pretrained=False)
    d = read(tmp_path / "features_text_queries.hdf5")
    core = sample["core"]
    rel = sorted(str(p.relative_to(core)) for p in core.rglob("T*.txt"))
    assert d["index"] == [r.replace("é", "#U00e9") for r in rel]
    assert d["features"].dtype == np.float16
    torch.manual_seed(0)
    model = open_clip.create_model("RN50", pretrained=None).eval()
    tok = open_clip.get_tokenizer("RN50")
    with torch.no_grad():
        want = F.normalize(model.encode_text(tok([(core / r).read_text().strip() for r in rel])), dim=-1)
    np.testing.assert_allclose(d["features"].astype(np.float32), want.numpy(), atol=2e-3)


def test_selected_ids_order_and_filter(ray_cluster, sample, tmp_path):
    core = sample["core"]
    ids = expected_ids(core, "pos")[::-1][:5]
    raw = [i.replace("#U00e9", "é") for i in ids]
    sel = tmp_path / "sel.txt"
    sel.write_text("\n".join(f"{r},extra-column" for r in raw) + "\n", encoding="utf-8")
    extract(tmp_path, core, partition="uned", selected_ids=str(sel), pretrained=False)
    assert read(tmp_path / "features_uned.hdf5")["index"] == ids  # the file's order, not sorted

    keys = sample["distractor_keys"][3:9:2]
    sel2 = tmp_path / "sel2.txt"
    sel2.write_text("\n".join(k.split("/")[1] for k in keys))
    # With several partitions, the list filters the distractors only.
    extract(
        tmp_path,
        core,
        partition="image_queries,distractors",
        distractors_dir=str(sample["yfcc"]),
        selected_ids=str(sel2),
        pretrained=False,
    )
    d = read(tmp_path / "features_distractors_00000.hdf5")
    assert d["index"] + d["skipped_index"] == keys or sorted(d["index"] + d["skipped_index"]) == sorted(keys)
    assert [k for k in keys if k not in sample["corrupt_ids"]] == d["index"]
    assert read(tmp_path / "features_image_queries.hdf5")["index"] == expected_ids(core, "quer")


def test_rerun_skip_refuse_overwrite(ray_cluster, sample, tmp_path):
    core = sample["core"]
    extract(tmp_path, core, partition="image_queries", pretrained=False)
    f = tmp_path / "features_image_queries.hdf5"
    mtime = f.stat().st_mtime_ns
    s = extract(tmp_path, core, partition="image_queries", pretrained=False)
    assert s["already_done"] == [f.name] and s["written"] == [] and f.stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="resolution: 64 -> 96"):
        extract(tmp_path, core, partition="image_queries", pretrained=False, resolution=96)
    s = extract(tmp_path, core, partition="image_queries", pretrained=False, resolution=96, overwrite=True)
    assert s["written"] == [f.name]
    assert '"resolution": 96' in read(f)["attrs"]["ilias_ray_settings"]
    # A leftover partial file is redone, never trusted.
    (tmp_path / "features_positives.hdf5.partial").write_bytes(b"junk")
    s = extract(tmp_path, core, partition="positives", pretrained=False)
    assert s["written"] == ["features_positives.hdf5"]
    assert not (tmp_path / "features_positives.hdf5.partial").exists()


def test_local_pooling_offsets_and_options(ray_cluster, sample, tmp_path):
    core = sample["core"]
    extract(tmp_path, core, partition="image_queries", pretrained=False, pooling="local", store_fp16=False)
    d = read(tmp_path / "features_image_queries.hdf5")
    off = d["offsets"]
    assert d["features"].dtype == np.float32 and off[0] == 0 and off[-1] == len(d["features"])
    assert len(off) == len(d["index"]) + 1
    for i, id_ in enumerate(d["index"]):
        w, h = ImageOps.exif_transpose(Image.open(core / id_.replace("#U00e9", "é"))).size
        ar = h / w
        rw, rh = (64, int(64 * ar)) if ar <= 1 else (int(64 / ar), 64)
        assert off[i + 1] - off[i] == -(-rw // 16) * -(-rh // 16)  # patch tokens, class token dropped
    np.testing.assert_allclose(np.linalg.norm(d["features"], axis=1), 1, atol=1e-5)

    # Box files drive --crop_resize and --masking; every transform runs; gzip applies.
    outs = {}
    for name, kw in {
        "plain": {},
        "crop": {"crop_resize": True},
        "mask": {"masking": True},
        "pad": {"transforms": "RESIZE_PAD", "pooling": "gem"},
        "tta": {"multiscale": True, "multirotate": True, "transforms": "RESIZE_SQUARE"},
        "small": {"transforms": "RESIZE_SMALL", "pooling": "cls", "hdf5_compression": 4},
        "center": {"transforms": "RESIZE_CENTER", "pooling": "rgem", "min_size": 80},
    }.items():
        extract(tmp_path / name, core, partition="image_queries", pretrained=False, **kw)
        outs[name] = read(tmp_path / name / "features_image_queries.hdf5")
        assert outs[name]["features"].shape == (4, 192)
    for name in outs:
        if name != "plain":
            assert not np.allclose(outs[name]["features"], outs["plain"]["features"]), name
    with h5py.File(tmp_path / "small" / "features_image_queries.hdf5") as f:
        assert f["features"].compression == "gzip" and f["features"].compression_opts == 4


def test_config_errors_before_ray(tmp_path, sample):
    with pytest.raises(UserError, match="divisible"):
        extract(tmp_path, sample["yfcc"], partition="distractors", start_tar=1, tar_batch_size=2)
    with pytest.raises(UserError, match="not a directory"):
        extract(tmp_path, tmp_path / "missing")
    with pytest.raises(UserError, match="timm has no model .no_such_model_xyz.; nearest"):
        extract(tmp_path, sample["core"], model="no_such_model_xyz")
    with pytest.raises(UserError, match="text_queries goes with --framework text"):
        extract(tmp_path, sample["core"], partition="text_queries")
    with pytest.raises(UserError, match="box file"):
        (tmp_path / "c" / "i" / "query").mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(tmp_path / "c" / "i" / "query" / "Q1.jpg")
        extract(tmp_path, tmp_path / "c", masking=True, pretrained=False)
    assert not list(tmp_path.glob("*.hdf5"))
