"""Stage A (optimal float zero-point for a fixed scale) against an exact float64 brute force."""
import numpy as np
import pytest
import torch

from neuqi_export.errors import UserError
from neuqi_export.quant.zeropoint import objective, optimal_zero_point

EPS32 = float(np.finfo(np.float32).eps)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def brute_force(x: np.ndarray, h: np.ndarray, bits: int) -> float:
    """min over real Z of f(Z), float64: every breakpoint where an element's clamped code changes
    (x_j + Z = k + 1/2, k = 0..L-2) splits Z into intervals with fixed codes (the clamp regions included,
    as the two unbounded ends); on each, f is a quadratic minimised in closed form, clamped to it."""
    L = 1 << bits
    x = np.asarray(x, np.float64)
    h = np.asarray(h, np.float64)
    if h.sum() == 0:
        h = np.ones_like(h)
    h = h / h.sum()
    bp = np.unique((np.arange(L - 1)[None, :] + 0.5 - x[:, None]).ravel())
    lo = np.concatenate([[-np.inf], bp])
    hi = np.concatenate([bp, [np.inf]])
    mid = np.where(np.isinf(lo), hi - 1.0, np.where(np.isinf(hi), lo + 1.0, 0.5 * (lo + hi)))
    best = np.inf
    for a in range(0, len(mid), 2048):
        sl = slice(a, a + 2048)
        q = np.clip(np.round(x[None, :] + mid[sl, None]), 0, L - 1)  # codes inside each interval
        z = np.clip((h * (q - x)).sum(1), lo[sl], hi[sl])
        e = x[None, :] + z[:, None] - q
        best = min(best, float((h * e * e).sum(1).min()))
    return best


def _case(rng: np.random.Generator, kind: str, G: int, bits: int):
    L = 1 << bits
    w = rng.standard_t(2.0, G)
    h = rng.uniform(0.0, 1.0, G)
    if kind == "constant":
        w = np.full(G, rng.normal())
    elif kind == "allzero":
        w = np.zeros(G)
    elif kind == "skewed_h":
        h = np.exp(rng.normal(0.0, 5.0, G))  # spans ~20 orders of magnitude
    elif kind == "h_zeros":
        h = h * (rng.uniform(size=G) < 0.3)
    elif kind == "h_allzero":
        h = np.zeros(G)
    elif kind == "lattice":  # many elements exactly on the grid / on rounding ties
        w = np.round(rng.normal(size=G) * 4) / 2
    rngw = w.max() - w.min()
    s = (rngw if rngw > 0 else 1.0) / (L - 1) * rng.uniform(0.1, 1.3)
    x = w / s
    if kind == "tiny":  # 1e-8 magnitudes: the whole group inside one rounding cell
        x = rng.standard_t(2.0, G) * 1e-8
    elif kind == "huge":  # 1e3 magnitudes: heavy clipping
        x = rng.standard_t(2.0, G) * 1e3
    elif kind == "offset":  # the group far from the code range
        x = x + rng.normal() * 100
    return x.astype(np.float32), h.astype(np.float32)


KINDS = ["heavy", "constant", "allzero", "skewed_h", "h_zeros", "h_allzero", "lattice", "tiny", "huge", "offset"]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_brute_force_on_adversarial_groups(bits):
    rng = np.random.default_rng(100 + bits)
    L = 1 << bits
    n_each = 4 if bits == 8 else 8
    for G in (7, 32, 128):
        cases = [_case(rng, k, G, bits) for k in KINDS for _ in range(n_each)]
        X = torch.tensor(np.stack([c[0] for c in cases]))
        H = torch.tensor(np.stack([c[1] for c in cases]))
        zero, err = optimal_zero_point(X, H, bits)  # one batched call for all groups
        assert zero.shape == err.shape == (len(cases),) and zero.dtype == torch.float32
        # err is f at the returned zero
        torch.testing.assert_close(err.double(), objective(X, H, zero, bits), rtol=1e-6, atol=1e-30)
        for i, (x, h) in enumerate(cases):
            ref = brute_force(x, h, bits)
            # the float32 zero-point is within half an ulp of any real optimum: f grows by at most that squared
            atol = (2 * EPS32 * (np.abs(x).max() + L)) ** 2
            assert err[i].item() >= ref * (1 - 2 * EPS32)  # err is returned in float32
            assert err[i].item() <= ref * (1 + 1e-6) + atol, (KINDS[i // n_each], G, err[i].item(), ref)


def test_batched_shapes_and_exact_easy_cases():
    # constant groups: reproduced exactly (f = 0); a group on the integer grid: f = 0
    x = torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 1.0, 2.0, 3.0], [-7.25, -6.25, -5.25, -4.25]])
    zero, err = optimal_zero_point(x.reshape(3, 1, 4), torch.ones(3, 1, 4), 2)
    assert zero.shape == (3, 1)
    assert torch.all(err == 0)
    q = torch.clamp(torch.round(x + zero), 0, 3)
    torch.testing.assert_close(q - zero, x, rtol=0, atol=1e-6)
    # uniform h and h = 0 everywhere give the same answer (fallback to uniform)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 32, generator=g) * 3
    z1, e1 = optimal_zero_point(X, torch.ones_like(X), 3)
    z0, e0 = optimal_zero_point(X, torch.zeros_like(X), 3)
    torch.testing.assert_close(e0, e1)


def test_deterministic():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 128, generator=g) * 2
    H = torch.rand(64, 128, generator=g)
    a = optimal_zero_point(X, H, 3)
    b = optimal_zero_point(X, H, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bad_arguments():
    x = torch.zeros(4, 8)
    with pytest.raises(UserError, match="bits"):
        optimal_zero_point(x, torch.ones_like(x), 5)
    with pytest.raises(UserError, match="NaN"):
        optimal_zero_point(torch.full((2, 4), float("nan")), torch.ones(2, 4), 2)
    with pytest.raises(UserError, match="shape"):
        optimal_zero_point(x, torch.ones(4, 7), 2)
    with pytest.raises(UserError, match="non-negative"):
        optimal_zero_point(x, -torch.ones_like(x), 2)
