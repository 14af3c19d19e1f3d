"""`--framework cvn`: CVNet / SuperGlobal global descriptors (ResNet-50 variants only, CPU, random weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ilias_ray.config
import ilias_ray.models.base
import ilias_ray.models.registry
from ilias_ray.config import Config
from ilias_ray.errors import UserError
from ilias_ray.models import cvn
from ilias_ray.models.registry import check
from stage_settings import embedder

BASE = dataclasses.asdict(Config(dataset_dir=".", hdf5_dir="."))


PIXELS = torch.randint(0, 256, (2, 75, 101, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


# Large enough for a 5x7 last map: SuperGlobal's regional GeM is applied (it is skipped below 5x5).
BIG = torch.randint(0, 256, (1, 160, 224, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


R50 = ("cvnet_resnet50", "superglobal_resnet50")


def cfg(model, **kw):
    return dict(BASE, **dict(dict(framework="cvn", model=model, pretrained=False), **kw))


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(ilias_ray.config.FRAMEWORKS, "cvn", "ilias_ray.models.cvn")


def unit(f):
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(f.shape[0]), rtol=0, atol=1e-4)


def test_names_and_spec():
    assert cvn.names() == ("cvnet_resnet101", "cvnet_resnet50", "superglobal_resnet101", "superglobal_resnet50")
    for name in cvn.names():
        s = cvn.spec(name)
        assert s.poolings == ("head",) and s.patch == 0
        assert s.mean == ilias_ray.models.base.IMAGENET_MEAN and s.std == ilias_ray.models.base.IMAGENET_STD
        assert s.weights.public is False and s.weights.source == "user checkpoint" and s.weights.cached is None
        depth = name.rsplit("resnet", 1)[1]
        assert f"CVPR2022_CVNet_R{depth}.pyth" in s.weights.hint
    with pytest.raises(UserError, match="nearest: cvnet_resnet50"):
        cvn.spec("cvnet_resnet5")


def test_architecture_names_match_the_release_layout():
    keys = cvn.CVNetGlobal(101).state_dict().keys()
    for k in (
        "stem.conv.weight",
        "stem.bn.running_var",
        "s1.b1.proj.weight",
        "s1.b1.bn.weight",
        "s1.b1.f.a.weight",
        "s1.b1.f.a_bn.bias",
        "s1.b1.f.b.weight",
        "s1.b1.f.c_bn.running_mean",
        "s3.b23.f.c.weight",
        "s4.b3.f.c_bn.weight",
        "head.pool.p",
        "head.fc.weight",
        "head.fc.bias",
    ):
        assert k in keys, k
    assert "s1.b2.proj.weight" not in keys and "s3.b24.f.a.weight" not in keys
    m = cvn.CVNetGlobal(50)
    assert m.s2.b1.f.b.stride == (2, 2) and m.s2.b1.f.a.stride == (1, 1) and m.s2.b1.proj.stride == (2, 2)
    assert m.s1.b1.f.b.stride == (1, 1)
    assert m.head.pool.p.shape == (1,) and m.head.fc.in_features == m.head.fc.out_features == 2048
    assert len(m.s3._modules) == 6 and len(cvn.CVNetGlobal(101).s3._modules) == 23


RANDOM = {}  # model -> features of PIXELS with the seeded random weights (computed once)


@pytest.mark.parametrize("model", cvn.names())
def test_builds_random_and_embeds(model):
    c = cfg(model)
    if model.endswith("101"):  # build only: the 101s are slow to run on a CPU
        bb = ilias_ray.models.registry.build("cvn", model, pretrained=False)
        assert bb.features is None and bb.patch == 0
        assert bb.model.head.pool.p.item() == 3.0 and not bb.model.training
        return
    emb = embedder(c)
    f = emb.embed_pixels(PIXELS)
    assert f.shape == (2, 2048) and torch.isfinite(f).all()
    unit(f)
    RANDOM[model] = f
    g = emb.embed_pixels(BIG)
    assert g.shape == (1, 2048) and torch.isfinite(g).all()
    unit(g)


def random_features(model):
    if model not in RANDOM:
        RANDOM[model] = embedder(cfg(model)).embed_pixels(PIXELS)
    return RANDOM[model]


def test_superglobal_differs_from_cvnet_on_the_same_weights():
    a, b = (random_features(m) for m in R50)
    assert not torch.allclose(a, b, atol=1e-3)


def release_checkpoint(path, model, drop=None):
    sd = {"encoder_q." + k: v for k, v in model.state_dict().items() if k != drop}
    # Unrelated modules of the release file: the momentum twin and the correlation/rerank modules.
    sd["encoder_k.stem.conv.weight"] = torch.zeros(64, 3, 7, 7)
    sd["cv_learner.conv1.weight"] = torch.randn(4, 4, 3, 3)
    sd["encoder_q.queue"] = torch.zeros(3)  # an encoder-side extra too
    torch.save({"epoch": 7, "model_state": sd, "optimizer_state": {"lr": torch.tensor(0.1)}}, path)
    return str(path)


def test_release_checkpoint_reproduces_features(tmp_path):
    torch.manual_seed(123)
    other = cvn.CVNetGlobal(50)  # not the seeded random init: loading must change the weights
    with torch.no_grad():
        other.head.pool.p.fill_(2.5)
    path = release_checkpoint(tmp_path / "CVPR2022_CVNet_R50.pyth", other)
    x = torch.randn(2, 3, 64, 80)
    for model in R50:
        bb = ilias_ray.models.registry.build("cvn", model, checkpoint=path, pretrained=False)
        assert bb.model.head.pool.p.item() == 2.5
        got = bb.model.state_dict()
        for k, v in other.state_dict().items():
            assert torch.equal(got[k], v), k
        other.superglobal = bb.model.superglobal
        other.eval()
        with torch.no_grad():
            assert torch.equal(bb.head(x), other(x.flip(1)))
    # Through the Embedder: a checkpoint of the seeded random model gives the random model's features.
    torch.manual_seed(0)
    rnd = ilias_ray.models.registry.build("cvn", "cvnet_resnet50", pretrained=False).model
    path = release_checkpoint(tmp_path / "random.pyth", rnd)
    for model in R50:
        want = random_features(model)
        got = embedder(cfg(model, checkpoint=path, pretrained=True)).embed_pixels(PIXELS)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_checkpoint_missing_a_key_is_a_user_error(tmp_path):
    path = release_checkpoint(tmp_path / "broken.pyth", cvn.CVNetGlobal(50), drop="s2.b3.f.b.weight")
    with pytest.raises(UserError, match=r"broken\.pyth.*s2\.b3\.f\.b\.weight"):
        ilias_ray.models.registry.build("cvn", "cvnet_resnet50", checkpoint=path, pretrained=False)


def test_wrong_depth_checkpoint_is_a_user_error(tmp_path):
    path = release_checkpoint(tmp_path / "r50.pyth", cvn.CVNetGlobal(50))
    with pytest.raises(UserError, match=r"r50\.pyth.*missing.*CVPR2022_CVNet_R101\.pyth"):
        ilias_ray.models.registry.build("cvn", "superglobal_resnet101", checkpoint=path, pretrained=False)


def test_superglobal_math_independently():
    torch.manual_seed(5)
    x = torch.rand(2, 6, 7, 9) * 3  # non-negative, like the ReLU'd last map

    # rgem, written out: the generalised mean (p=2.5) of each reflection-padded 5x5 window.
    xp = F.pad(x, (2, 2, 2, 2), mode="reflect")
    win = xp.unfold(2, 5, 1).unfold(3, 5, 1)  # (b, c, 7, 9, 5, 5)
    local = (win.pow(2.5).sum(dim=(-1, -2)) / 25).pow(1 / 2.5)
    y = 0.5 * local + 0.5 * x
    # GeM+ (p=4.4) over positions, then L2 normalisation.
    g = y.reshape(2, 6, -1).clamp(min=1e-8).pow(4.4).mean(-1).pow(1 / 4.4)
    want = g / g.norm(dim=1, keepdim=True)
    torch.testing.assert_close(cvn.superglobal_pool(x), want, rtol=1e-5, atol=1e-6)

    # A map smaller than 5x5 skips the regional step.
    s = torch.rand(1, 4, 3, 4)
    g = s.reshape(1, 4, -1).pow(4.4).mean(-1).pow(1 / 4.4)
    torch.testing.assert_close(cvn.superglobal_pool(s), g / g.norm(dim=1, keepdim=True))

    # Through the model: head.fc of the normalised GeM+ vector.
    m = cvn.CVNetGlobal(50, superglobal=True).eval()
    with torch.no_grad():
        x4 = torch.rand(2, 2048, 5, 6)
        xp = F.pad(x4, (2, 2, 2, 2), mode="reflect").unfold(2, 5, 1).unfold(3, 5, 1)
        y = 0.5 * (xp.pow(2.5).mean(dim=(-1, -2))).pow(1 / 2.5) + 0.5 * x4
        g = y.flatten(2).pow(4.4).mean(-1).pow(1 / 4.4)
        want = F.linear(g / g.norm(dim=1, keepdim=True), m.head.fc.weight, m.head.fc.bias)
        torch.testing.assert_close(m.descriptor(x4), want, rtol=1e-4, atol=1e-5)
        # CVNet: GeM with the learnable p, then head.fc, without normalisation.
        m.superglobal = False
        m.head.pool.p.fill_(3.0)
        g = x4.flatten(2).pow(3.0).mean(-1).pow(1 / 3.0)
        torch.testing.assert_close(
            m.descriptor(x4), F.linear(g, m.head.fc.weight, m.head.fc.bias), rtol=1e-4, atol=1e-5
        )


def block_out(w_in, w_out, w_b, x):
    """A block with zero convs except f.c = all ones, identity BNs: f(x) = w_b * floor(inner)."""
    blk = cvn.ResBlock(w_in, w_out, 1, w_b).eval()
    with torch.no_grad():
        for mod in blk.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.zero_()
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_var.fill_(1 - mod.eps)  # exact identity
        blk.f.c.weight.fill_(1.0)
        if blk.proj_block:  # identity projection of the first min(w_in, w_out) channels
            for i in range(min(w_in, w_out)):
                blk.proj.weight[i, i] = 1.0
        return blk(x)


def test_clamp_activation_rule():
    assert [cvn.inner_alpha(w) for w in (256, 512, 1024, 2048)] == [0.014, 0.0, 0.0, 0.0]
    assert [cvn.out_alpha(w) for w in (256, 512, 1024, 2048)] == [0.014, 0.014, 0.014, 0.0]
    v = torch.tensor([-5.0, -0.001, 0.0, 0.5])

    def inp(c):
        return v.view(1, 1, 1, 4).expand(1, c, 2, 4).clone()

    # w_out 256 (stage 1): inner activations floor at 0.014, so f(x) = 4 * 0.014 with w_b = 4;
    # the block output floors at 0.014.
    out = block_out(256, 256, 4, inp(256))[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.014, 0.055, 0.056, 0.556]), rtol=0, atol=1e-6)
    # w_out 512 / 1024: inner floors 0 (f(x) = 0), output floor 0.014.
    for w in (512, 1024):
        out = block_out(w, w, 4, inp(w))[0, 0, 0]
        torch.testing.assert_close(out, torch.tensor([0.014, 0.014, 0.014, 0.5]), rtol=0, atol=1e-6)
    # w_out 2048 (stage 4): plain ReLU everywhere.
    out = block_out(2048, 2048, 4, inp(2048))[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 0.0, 0.5]), rtol=0, atol=1e-6)
    # A projection block of stage 1 (64 -> 256) uses the same floors.
    out = block_out(64, 256, 4, inp(64))[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.014, 0.055, 0.056, 0.556]), rtol=0, atol=1e-6)
    # The stem uses a plain ReLU.
    assert isinstance(cvn.CVNetGlobal(50).stem.relu, torch.nn.ReLU)


def test_channels_are_flipped_to_bgr():
    # Keep only the stem's input channel 0: the model then sees only its channel 0, which must be the
    # image's BLUE channel (the RGB tensor is flipped to BGR before the stem).
    emb = embedder(cfg("cvnet_resnet50"))
    with torch.no_grad():
        emb.bb.model.stem.conv.weight[:, 1:] = 0
    base = emb.embed_pixels(PIXELS)
    rg = PIXELS.clone()
    rg[..., :2] = 255 - rg[..., :2]  # change red and green
    torch.testing.assert_close(emb.embed_pixels(rg), base, rtol=0, atol=0)
    b = PIXELS.clone()
    b[..., 2] = 255 - b[..., 2]  # change blue
    assert (emb.embed_pixels(b) - base).abs().max() > 1e-3
    # And the head is the reference forward on the flipped tensor.
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(emb.bb.head(x), emb.bb.model(x.flip(1)), rtol=0, atol=0)


def test_check_and_build_need_a_checkpoint_for_pretrained(tmp_path):
    for model in cvn.names():
        with pytest.raises(UserError, match=r"CVPR2022_CVNet_R\d+\.pyth"):
            check("cvn", model, pooling="head", pretrained=True)
        with pytest.raises(UserError, match=r"not public.*CVPR2022_CVNet_R\d+\.pyth"):
            ilias_ray.models.registry.build("cvn", model, pretrained=True)
    with pytest.raises(UserError, match="supported: head"):
        check("cvn", "cvnet_resnet50", pooling="gem", checkpoint=str(tmp_path / "x.pyth"), pretrained=False)
    spec = check("cvn", "superglobal_resnet50", pooling="head", checkpoint=str(tmp_path / "x.pyth"), pretrained=False)
    assert spec.poolings == ("head",)
