"""The model zoo: every framework builds offline, embeds odd-sized images, loads checkpoints safely."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.models.base import IMAGENET_MEAN, IMAGENET_STD
from ilias_ray.models.registry import check, framework
from ilias_ray.models.table import benchmark_rows
from ilias_ray.stages.rows import State
from ilias_ray.stages.rows import object_column as objects
from ilias_ray.testing.batches import routed
from stage_settings import embedder

BASE = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))


# An image whose sides are multiples of neither 14 nor 16 (nor 8), and not square.
PIXELS = torch.randint(0, 256, (2, 75, 101, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


CASES = [
    ("timm", "vit_tiny_patch16_224"),
    ("timm", "resnet18"),
    ("tv", "alexnet"),
    ("och", "RN50.openai"),
    ("fb", "dinov2_vits14_reg"),
    ("fb", "dino_vits8"),
    ("fb", "mocov3_resnet50"),
    ("cvn", "superglobal_resnet50"),
    ("unicom", "unicom_vit_base_patch16_224"),
    ("hier", "dino_vit16_patch16_224_sop"),
    ("timm", "recall_512-resnet50"),
]


def cfg(fw, model, **kw):
    return dict(BASE, framework=fw, model=model, pretrained=False, resolution=100, **kw)


@pytest.mark.parametrize("fw,model", CASES)
def test_builds_and_embeds_every_supported_pooling(fw, model):
    spec = framework(fw).spec(model)
    emb = embedder(cfg(fw, model))
    for pooling in spec.poolings:
        emb.pooling = pooling  # one model, every pooling
        check(fw, model, pooling=pooling, pretrained=False)
        f = emb.embed_pixels(PIXELS)
        assert torch.isfinite(f).all(), pooling
        torch.testing.assert_close(f.norm(dim=-1), torch.ones(f.shape[:-1]), rtol=0, atol=1e-4)
        if pooling == "local":
            assert f.ndim == 3 and f.shape[0] == 2
            if spec.patch:  # padded to a multiple of spec.patch, then cut into the model's patches
                tp = emb.bb.model.patch_embed.proj.kernel_size[0]
                h, w = (-(-n // spec.patch) * spec.patch // tp for n in (75, 101))
                assert f.shape[1] == h * w
        else:
            assert f.ndim == 2 and f.shape[0] == 2


def features(c):
    return embedder(c).embed_pixels(PIXELS)


def test_checkpoints_reproduce_features(tmp_path):
    # timm/tv: a plain state_dict; fb MoCo v3: the released layout (prefixes, momentum twin, projector).
    torch.manual_seed(5)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet.pth")  # the hub's layout
    a = embedder(cfg("tv", "alexnet", pooling="gem", checkpoint=str(tmp_path / "alexnet.pth")))
    x = torch.randint(0, 256, (2, 75, 101, 3), dtype=torch.uint8)
    torch.manual_seed(5)
    ref = torchvision.models.alexnet().eval()
    t = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        fmap = ref.features(t)
        want_head = torch.nn.functional.normalize(ref.classifier[:6](torch.flatten(ref.avgpool(fmap), 1)), dim=-1)
    assert a.embed_pixels(x).shape == (2, 256)
    a.pooling = "head"  # the reference: classifier[6] replaced by Identity, 4096-d
    torch.testing.assert_close(a.embed_pixels(x), want_head, rtol=1e-4, atol=1e-5)
    plain = tmp_path / "ours.pth"  # a file saved from our model (no classifier.6) loads too
    torch.save(framework("tv").build("alexnet", pretrained=False).model.state_dict(), plain)
    torch.testing.assert_close(features(cfg("tv", "alexnet", checkpoint=str(plain))), features(cfg("tv", "alexnet")))

    r50 = framework("fb").build("mocov3_resnet50", pretrained=False).model.state_dict()
    released = {f"module.base_encoder.{k}": v for k, v in r50.items()}
    released.update({f"module.momentum_encoder.{k}": v + 1 for k, v in r50.items()})
    released["module.base_encoder.fc.0.weight"] = torch.zeros(4096, 2048)  # the MLP projector
    released["module.predictor.0.weight"] = torch.zeros(4096, 256)
    torch.save({"state_dict": released, "epoch": 1000}, tmp_path / "r-50-1000ep.pth.tar")
    torch.testing.assert_close(
        features(cfg("fb", "mocov3_resnet50")),
        features(cfg("fb", "mocov3_resnet50", checkpoint=str(tmp_path / "r-50-1000ep.pth.tar"))),
    )


def test_dinov2_reg_original_key_names_load_through_timm(tmp_path):
    """The original DINOv2 checkpoint layout (register_tokens, mask_token) maps onto timm's model."""
    model = framework("fb").build("dinov2_vits14_reg", pretrained=False).model
    sd = model.state_dict()
    original = {("register_tokens" if k == "reg_token" else k): v for k, v in sd.items()}
    original["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    # The original pos_embed also has a slot for the class token (timm folds it away).
    original["pos_embed"] = torch.cat([torch.zeros_like(sd["pos_embed"][:, :1]), sd["pos_embed"]], dim=1)
    assert "register_tokens" in original and "reg_token" not in original
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(original, path)
    for pooling in ("head", "gap"):
        torch.testing.assert_close(
            features(cfg("fb", "dinov2_vits14_reg", pooling=pooling)),
            features(cfg("fb", "dinov2_vits14_reg", pooling=pooling, checkpoint=str(path))),
        )


def test_open_clip_checkpoint(tmp_path):
    import open_clip

    torch.manual_seed(3)
    sd = open_clip.create_model("RN50").state_dict()
    path = tmp_path / "rn50.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    a = features(cfg("och", "RN50.openai", checkpoint=str(path)))
    b = features(cfg("och", "RN50.openai"))  # seed 0: other weights
    assert not torch.allclose(a, b)
    visual = open_clip.create_model("RN50", pretrained=str(path)).visual.eval()
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    emb = embedder(cfg("och", "RN50.openai", checkpoint=str(path)))
    # At 224 px the map is 7x7 and nothing is resized: the plain open_clip tower is the reference.
    big = torch.randint(0, 256, (1, 224, 224, 3), dtype=torch.uint8)
    with torch.no_grad():
        want = torch.nn.functional.normalize(visual(((big.permute(0, 3, 1, 2).float() / 255) - mean) / std), dim=-1)
    torch.testing.assert_close(emb.embed_pixels(big), want, rtol=1e-4, atol=1e-5)
    # Other sizes give other map shapes; the resized position embedding makes them work.
    assert emb.embed_pixels(PIXELS).shape == (2, 1024)
    # The text tower loads the same open_clip checkpoint (--framework text --checkpoint).
    text = embedder(cfg("text", "RN50.openai", checkpoint=str(path)))
    assert text.bb.model.visual is None  # only the text tower is kept
    prompts = ["a red mug on a desk", "the eiffel tower at night"]
    full = open_clip.create_model("RN50", pretrained=str(path)).eval()
    with torch.no_grad():
        want = torch.nn.functional.normalize(full.encode_text(open_clip.get_tokenizer("RN50")(prompts)), dim=-1)
    torch.testing.assert_close(text.embed_texts(prompts), want)


def test_unknown_names_and_missing_weights_are_clean_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="nearest: dinov2_vitl14_reg"):
        check("fb", "dinov2_vitl14_regs", pooling="head", pretrained=False)
    with pytest.raises(UserError, match="unknown --framework"):
        check("nope", "x", pooling="head", pretrained=False)
    with pytest.raises(UserError, match="not supported"):
        check("tv", "alexnet", pooling="cls", pretrained=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch"))
    for fw, model in CASES:
        with pytest.raises(UserError, match="(not in the local cache|no public weights).*(download|--checkpoint)"):
            check(fw, model, pooling="head", pretrained=True)
    torch.save({"junk.weight": torch.zeros(2)}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not fit the model"):
        framework("tv").build("alexnet", checkpoint=str(tmp_path / "wrong.pth"), pretrained=False)


def test_remote_code_only_behind_the_flag(tmp_path, monkeypatch):
    calls = []

    def fake_hub_load(repo, entry, trust_repo=None, **kw):
        calls.append((repo, entry, trust_repo))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(torch.hub, "load", fake_hub_load)
    r50 = framework("fb").build("swav", pretrained=False).model.state_dict()
    torch.save({f"module.{k}": v for k, v in r50.items()}, tmp_path / "swav.pth.tar")
    framework("fb").build("swav", checkpoint=str(tmp_path / "swav.pth.tar"), pretrained=False)
    framework("fb").build("swav", pretrained=False, trust_remote_code=True)  # random weights: no hub either
    assert calls == []
    framework("fb").build("swav", pretrained=True, trust_remote_code=True)
    assert calls == [("facebookresearch/swav:main", "resnet50", True)]
    # Nothing else in the package calls torch.hub.load or unpickles without weights_only=True.
    src = subprocess.run(
        ["grep", "-rn", r"torch\.hub\.load(\|torch\.load(", "ilias_ray"], capture_output=True, text=True
    ).stdout.splitlines()
    assert all("fb.py" in ln and "trust_repo=trust_remote_code" in ln or "weights_only=True" in ln for ln in src), src


def test_models_command_lists_the_benchmark_table():
    out = subprocess.run(
        [sys.executable, "-m", "ilias_ray", "models"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    rows = benchmark_rows()
    assert len(rows) > 60
    for r in rows:
        assert r["model"] in out.stdout
    p = subprocess.run(
        [sys.executable, "-m", "ilias_ray", "models", "--framework", "timm", "--model", "vit_tiny_patch16_224x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "nearest: vit_tiny_patch16_224" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_models_without_public_hub_names_load_user_checkpoints(tmp_path):
    # recall/udon/uscrr: a timm architecture with a dim-d embedding layer as its classifier.
    for name, dim in (("recall_512-resnet50", 512), ("udon_64-vit_base_patch16_224.augreg_in21k_ft_in1k", 64)):
        spec = framework("timm").spec(name)
        assert not spec.weights.public and f"num_classes={dim}" in spec.weights.hint
        with pytest.raises(UserError, match="no public weights"):
            check("timm", name, pooling="head", pretrained=True)
        model = framework("timm").build(name, pretrained=False).model
        path = tmp_path / f"{dim}.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
        pooling = "cls" if "vit" in name else "head"
        got = features(cfg("timm", name, pooling=pooling, checkpoint=str(path)))
        torch.testing.assert_close(got, features(cfg("timm", name, pooling=pooling)))
        if pooling == "head":
            assert got.shape == (2, dim)
    # hier: the checkpoint's width and head pick the architecture and embedding size.
    import timm

    torch.manual_seed(2)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=128).eval()
    path = tmp_path / "hier_sop.pth"
    torch.save(vit.state_dict(), path)
    got = features(cfg("hier", "dino_vit16_patch16_224_sop", checkpoint=str(path)))
    x = (PIXELS.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    x = torch.nn.functional.pad(x, (5, 6, 2, 3))  # 75 x 101 -> 80 x 112, left = pad // 2
    vit_dyn = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=128, dynamic_img_size=True)
    vit_dyn.load_state_dict(vit.state_dict())
    with torch.no_grad():
        want = torch.nn.functional.normalize(vit_dyn.eval()(x), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_hub_cache_and_offline_mode_are_honoured(tmp_path, vit_checkpoint):
    """Weights placed in the HF cache (HF_HOME) load with HF_HUB_OFFLINE=1: no network, no --checkpoint."""
    from conftest import VIT

    snap = tmp_path / "hf" / "hub" / f"models--timm--{VIT}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (snap / "snapshots" / ("0" * 40) / "model.safetensors").write_bytes(vit_checkpoint.read_bytes())
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run(
        [sys.executable, "-m", "ilias_ray", "models", "--framework", "timm", "--model", VIT],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "yes (weights cached)" in p.stdout, p.stdout + p.stderr
    code = (
        "import dataclasses, torch; from ilias_ray.config import Config; from ilias_ray.stages.embed import Embedder;"
        "from ilias_ray.job.stage_args import embedder_args;"
        f"c = dict(dataclasses.asdict(Config(dataset_dir='.', hdf5_dir='.')), model='{VIT}', resolution=64);"
        f"c2 = dict(c, checkpoint='{vit_checkpoint}');"
        "x = torch.randint(0, 256, (1, 40, 50, 3), dtype=torch.uint8);"
        "a, b = (Embedder(**embedder_args(Config(**s))).embed_pixels(x) for s in (c, c2));"
        "print('same' if torch.equal(a, b) else 'different')"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert p.stdout.strip() == "same", p.stderr[-2000:]
    empty = dict(env, HF_HOME=str(tmp_path / "nothing"))
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "ilias_ray",
            "extract",
            "--dataset_dir",
            str(tmp_path),
            "--hdf5_dir",
            str(tmp_path / "out"),
            "--model",
            VIT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=empty,
    )
    assert p.returncode == 2 and "not in the local cache and HF_HUB_OFFLINE=1" in p.stderr
    assert f"timm/{VIT}" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_fb_dino_position_embeddings_resize_like_the_originals():
    """DINO/DINOv2 resize their table by a scale factor (grid + 0.1) / M, bicubic, no antialias."""
    import timm

    emb = embedder(cfg("fb", "dinov2_vits14"))
    got = emb.embed_pixels(PIXELS)  # 75 x 101 -> padded to 84 x 112 -> a 6 x 8 grid
    sd = emb.bb.model.state_dict()
    table = sd["pos_embed"]
    m = int((table.shape[1] - 1) ** 0.5)
    grid = table[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    grid = torch.nn.functional.interpolate(grid, scale_factor=((6 + 0.1) / m, (8 + 0.1) / m), mode="bicubic")
    sd["pos_embed"] = torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, 48, -1)], dim=1)
    ref = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=(84, 112))
    ref.load_state_dict(sd)
    x = (PIXELS.permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    x = torch.nn.functional.pad(x, (5, 6, 4, 5))
    with torch.no_grad():
        want = torch.nn.functional.normalize(ref.eval()(x), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_weights_load_once_per_actor(monkeypatch):
    import numpy as np

    import ilias_ray.stages.embed as embed_mod

    calls = []
    real = embed_mod.build
    monkeypatch.setattr(embed_mod, "build", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    emb = embedder(cfg("timm", "resnet18"))
    img = np.zeros((20, 30, 3), np.uint8)
    batch = routed(
        3,
        state=np.full(3, State.PIXELS, np.int8),
        img=objects([img] * 3),
        mask=objects([np.zeros((0, 0), np.uint8)] * 3),
        data=objects([b""] * 3),
    )
    for _ in range(3):
        out = emb(batch)
    assert calls == [1] and out["feat"][0].shape == (1, 512) and out["feat"][0].dtype == np.float16


def test_out_of_memory_halves_the_batch_and_remembers(monkeypatch):
    import numpy as np

    emb = embedder(cfg("timm", "resnet18", batch_size=16))
    ref = embedder(cfg("timm", "resnet18", batch_size=16))
    imgs = torch.randint(0, 256, (10, 20, 30, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    batch = routed(
        10,
        state=np.full(10, State.PIXELS, np.int8),
        img=objects([im.numpy() for im in imgs]),
        mask=objects([np.zeros((0, 0), np.uint8)] * 10),
        data=objects([b""] * 10),
    )
    want = ref(batch)["feat"]
    monkeypatch.setenv("ILIAS_RAY_TESTING", "1")
    monkeypatch.setenv("ILIAS_RAY_FAULT", "forward:oom>3")  # any forward pass of more than 3 images "runs out"
    got = emb(batch)
    assert emb.fits == {(20, 30): 2}  # 16 -> 8 -> 4 -> 2, remembered for this shape
    assert all(np.array_equal(g, w) for g, w in zip(got["feat"], want)) and len(got["feat"]) == 10  # same features
    monkeypatch.delenv("ILIAS_RAY_FAULT")
    emb(batch)
    assert emb.fits == {(20, 30): 2}  # later batches of this shape start at the size that fit
