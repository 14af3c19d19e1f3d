"""Checks ilias_ray.models.pooling against independent numpy / plain-Python
computations written from the spec (never against the code under test)."""

import math

import numpy as np
import pytest
import torch

from ilias_ray.models.pooling import POOLINGS, pool, rmac_regions

P, EPS = 3.0, 1e-6


def np_map(x, token_pool):
    """forward_features output -> (b, c, h, w) float64 map, plus class token."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 4:
        return x, None
    cls = None
    if token_pool:
        cls, x = x[:, 0], x[:, 1:]
    b, n, d = x.shape  # n tokens
    m = np.zeros((b, d, n, 1))
    for i in range(b):
        for t in range(n):
            for c in range(d):
                m[i, c, t, 0] = x[i, t, c]
    return m, cls


def positions(m, i, c, region=None):
    """All values of channel c of image i inside region (left, top, w, h)."""
    _, _, H, W = m.shape
    left, top, rw, rh = region if region else (0, 0, W, H)
    return [m[i, c, r, s] for r in range(top, top + rh) for s in range(left, left + rw)]


def np_global(m, fn, region=None):
    b, c = m.shape[:2]
    return np.array([[fn(positions(m, i, k, region)) for k in range(c)] for i in range(b)])


def np_mean(v):
    return sum(v) / len(v)


def np_max(v):
    return max(v)


def np_gem(v):
    mm = min(0.0, min(v))
    return np_mean([max(a + mm, EPS) ** P for a in v]) ** (1.0 / P) - mm


def spec_regions(W, H):
    """R-MAC grid written directly from the spec text, in plain Python floats."""
    w = min(W, H)
    errs = []
    for steps in range(2, 8):
        b = (max(H, W) - w) / (steps - 1)
        errs.append(abs((w * w - w * b) / (w * w) - 0.4))
    idx = errs.index(min(errs))  # first minimum
    Wd, Hd = (idx + 1, 0) if H < W else (0, idx + 1)
    out = [(0, 0, W, H)]
    for lev in (2, 3):
        wl = math.floor(2 * w / (lev + 1))
        if wl == 0:
            continue
        wl2 = math.floor(wl / 2 - 1)
        bW = (W - wl) / (lev + Wd - 1) if lev + Wd > 1 else 0
        bH = (H - wl) / (lev + Hd - 1) if lev + Hd > 1 else 0
        lefts = [math.floor(wl2 + k * bW) - wl2 for k in range(lev + Wd)]
        tops = [math.floor(wl2 + k * bH) - wl2 for k in range(lev + Hd)]
        out += [(le, t, wl, wl) for t in tops for le in lefts]
    return out


def close(got, want, tol=1e-4):
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy().astype(np.float64), want, rtol=tol, atol=tol)


RNG = np.random.default_rng(0)


CNN = RNG.normal(size=(2, 3, 5, 7)).astype(np.float32)  # b, c, h, w (W=7, H=5)


TOK = RNG.normal(size=(2, 6, 4)).astype(np.float32)  # b, l, d


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


INPUTS = [
    pytest.param(CNN, False, id="cnn"),
    pytest.param(CNN, True, id="cnn-token_pool-ignored"),
    pytest.param(TOK, True, id="vit-cls"),
    pytest.param(TOK, False, id="vit-nocls"),
]


@pytest.mark.parametrize("x,token_pool", INPUTS)
@pytest.mark.parametrize("name,fn", [("gap", np_mean), ("mac", np_max), ("gem", np_gem)])
def test_global(x, token_pool, name, fn):
    m, _ = np_map(x, token_pool)
    out = pool(name, t(x), token_pool)
    assert out.shape == (x.shape[0], m.shape[1])
    close(out, np_global(m, fn))


def test_token_pool_excludes_class_token():
    x = TOK.copy()
    x[:, 0] = 100.0  # huge class token must not leak into patch pooling
    assert pool("mac", t(x), True).max().item() < 100.0
    assert pool("mac", t(x), False).max().item() == 100.0


def test_gem_plus_m_rule_by_hand():
    # positions [-1, 2]: m = -1, x + m = [-2, 1] -> [eps, 1];
    # mean of cubes = (eps^3 + 1) / 2, cube root, then minus m (+1).
    x = torch.tensor([[[[-1.0, 2.0]]]])
    want = ((EPS**3 + 1) / 2) ** (1 / 3) + 1
    assert abs(pool("gem", x, False).item() - want) < 1e-5
    # All-positive input: m = 0, plain GeM.
    x = torch.tensor([[[[1.0, 2.0]]]])
    assert abs(pool("gem", x, False).item() - (4.5 ** (1 / 3))) < 1e-5


def test_gem_negative_inputs():
    x = (RNG.normal(size=(2, 3, 4, 4)) - 2.0).astype(np.float32)  # mostly negative
    m, _ = np_map(x, False)
    close(pool("gem", t(x), False), np_global(m, np_gem))


def test_cls():
    out = pool("cls", t(TOK), True)
    close(out, TOK[:, 0].astype(np.float64), tol=0)


def test_cls_errors():
    with pytest.raises(ValueError, match="class token"):
        pool("cls", t(TOK), False)
    with pytest.raises(ValueError):
        pool("cls", t(CNN), False)
    with pytest.raises(ValueError):
        pool("cls", t(CNN), True)


@pytest.mark.parametrize("name", ["head", "avg", "", "GEM"])
def test_unknown_name(name):
    with pytest.raises(ValueError):
        pool(name, t(CNN), False)


def test_names():
    assert set(POOLINGS) == {"cls", "gap", "mac", "gem", "rmac", "rgem", "local"}


def test_local_cnn_order():
    b, c, h, w = CNN.shape
    out = pool("local", t(CNN), False)
    assert out.shape == (b, h * w, c)
    want = np.zeros((b, h * w, c))
    for i in range(b):
        for r in range(h):
            for s in range(w):
                for k in range(c):
                    want[i, r * w + s, k] = CNN[i, k, r, s]
    close(out, want, tol=0)


@pytest.mark.parametrize("token_pool", [True, False])
def test_local_tokens(token_pool):
    out = pool("local", t(TOK), token_pool)
    want = TOK[:, 1:] if token_pool else TOK
    assert out.shape == want.shape
    close(out, want.astype(np.float64), tol=0)


@pytest.mark.parametrize(
    "W,H",
    [
        (7, 7),
        (10, 7),
        (7, 10),
        (32, 24),
        (24, 32),
        (1, 1),
        (3, 40),
        (40, 3),
        (16, 12),
        (12, 16),
        (1, 6),
        (6, 1),
        (2, 2),
        (20, 20),
    ],
)
def test_rmac_regions_match_spec(W, H):
    got = rmac_regions(W, H)
    assert [tuple(r) for r in got] == spec_regions(W, H)
    assert got[0] == (0, 0, W, H)
    for left, top, rw, rh in got:
        assert rw > 0 and rh > 0
        assert 0 <= left and left + rw <= W and 0 <= top and top + rh <= H


def test_rmac_regions_small_cases_by_hand():
    # 7x7: w=7, square -> Wd=0, Hd=1. Level 2: wl=4, 2 lefts x 3 tops;
    # level 3: wl=3, 3 lefts x 4 tops.
    r = rmac_regions(7, 7)
    assert len(r) == 1 + 2 * 3 + 3 * 4
    assert sorted({le for le, _, rw, _ in r if rw == 4}) == [0, 3]
    assert sorted({tp for _, tp, rw, _ in r if rw == 4}) == [0, 1, 3]
    # 1x1: levels 2 and 3 have zero-size windows and are dropped.
    assert rmac_regions(1, 1) == [(0, 0, 1, 1)]


def test_rmac_regions_float32_like_reference():
    # The reference computes the grid in float32. For 2x32 (Hd=6, level 2:
    # wl=1, wl2=-1, 8 tops, step 31/7) the last top is floor(-1 + 7*f32(31/7))
    # + 1 = 30, not the exact 31.
    last = np.floor(np.float32(-1) + np.float32(7) * np.float32(31 / 7)) + 1
    assert last == 30
    level2 = rmac_regions(2, 32)[1 : 1 + 2 * 8]  # level 3 also has wl=1
    assert {rw for _, _, rw, _ in level2} == {1}
    assert max(tp for _, tp, _, _ in level2) == 30
    # 11x47 is an exact tie between 6 and 7 steps; float32 rounding in the
    # reference picks 7 steps (Hd=6): 1 + 2*(2+6) + 3*(3+6) = 44 regions.
    assert len(rmac_regions(11, 47)) == 44


def np_regional(x, token_pool, fn):
    m, _ = np_map(x, token_pool)
    H, W = m.shape[2:]
    return sum(np_global(m, fn, region) for region in spec_regions(W, H))


RX = RNG.normal(size=(2, 3, 6, 9)).astype(np.float32)  # W=9, H=6


RX_TALL = RNG.normal(size=(1, 2, 10, 4)).astype(np.float32)  # W=4, H=10


@pytest.mark.parametrize(
    "x,token_pool",
    [
        pytest.param(RX, False, id="cnn-wide"),
        pytest.param(RX_TALL, False, id="cnn-tall"),
        pytest.param(CNN, False, id="cnn-7x5"),
        pytest.param(TOK, True, id="vit-cls"),
        pytest.param(TOK, False, id="vit-nocls"),
    ],
)
@pytest.mark.parametrize("name,fn", [("rmac", np_max), ("rgem", np_gem)])
def test_regional(x, token_pool, name, fn):
    out = pool(name, t(x), token_pool)
    want = np_regional(x, token_pool, fn)
    assert out.shape == want.shape
    close(out, want)


def test_rmac_is_sum_not_mean():
    # Constant map: every region's MAC is 1, so R-MAC = number of regions.
    x = torch.ones(1, 1, 6, 9)
    assert pool("rmac", x, False).item() == len(rmac_regions(9, 6))


@pytest.mark.parametrize("name", ["gap", "mac", "gem", "rmac", "rgem", "local"])
def test_half_input_computed_in_float32(name):
    xh = t(RX).half()
    out = pool(name, xh, False)
    assert out.dtype == torch.float32
    ref = pool(name, xh.float(), False)
    assert torch.equal(out, ref)
    m, _ = np_map(xh.float().numpy(), False)
    if name == "gem":
        close(out, np_global(m, np_gem))


def test_cls_half_returns_float32():
    assert pool("cls", t(TOK).half(), True).dtype == torch.float32


def test_bad_ndim():
    with pytest.raises(ValueError):
        pool("gap", torch.zeros(2, 3), False)


def test_gem_with_negative_map():
    """GeM with m = min(0, min x) on a map that has negative values (the `+ m` shift)."""
    x = torch.randn(2, 5, 3, 4)
    got = pool("gem", x, False)
    exp = torch.zeros(2, 5)
    for i in range(2):
        for c in range(5):
            v = [float(t) for t in x[i, c].flatten()]
            m = min(0.0, min(v))
            exp[i, c] = (sum(max(t + m, 1e-6) ** 3 for t in v) / len(v)) ** (1 / 3) - m
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5)
