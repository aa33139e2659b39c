"""The optional numba fast path (neuqi_export/quant/fast_cpu.py) against the float64 brute force of Stage A and
against the torch reference implementation of init_params (impl="reference")."""
import numpy as np
import pytest
import torch

from neuqi_export.errors import UserError
from neuqi_export.quant import fast_cpu, params
from neuqi_export.quant.grid import n_groups
from neuqi_export.quant.params import group_loss, init_params

from test_zeropoint import KINDS, _case, brute_force

EPS32 = float(np.finfo(np.float32).eps)


def test_numba_fast_path_is_available():
    """numba is a declared dependency: CI must exercise the fast path, never skip it."""
    assert fast_cpu.HAVE_NUMBA


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _heavy(out, inp, seed=0, scale=0.02):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((out, inp)) * scale


def _hdiag(inp, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(inp, generator=g) ** 3 * 4 + 0.01


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_stage_a_matches_brute_force(bits):
    rng = np.random.default_rng(200 + bits)
    L = 1 << bits
    n_each = 4 if bits == 8 else 8
    for G in (7, 32, 128):
        cases = [_case(rng, k, G, bits) for k in KINDS for _ in range(n_each)]
        xs, hs = [], []
        for x, h in cases:
            o = np.argsort(x, kind="stable")
            h = h[o].astype(np.float64)
            xs.append(x[o].astype(np.float64))
            hs.append(h if h.sum() > 0 else np.ones_like(h))
        z, f = fast_cpu.stage_a(np.stack(xs), np.stack(hs), bits)
        for start in (-3.0, 0.0, 2.0 ** bits):  # a warm start anywhere changes nothing
            zs, fs = fast_cpu.stage_a(np.stack(xs), np.stack(hs), bits, z_start=start)
            np.testing.assert_array_equal(zs, z)
            np.testing.assert_array_equal(fs, f)
        for i, (x, h) in enumerate(cases):
            ref = brute_force(x, h, bits)
            atol = float((4 * EPS32 * (float(np.abs(x).max()) + L)) ** 2 * 1e-6)  # float64 work: far below float32 rounding
            assert f[i] >= ref * (1 - 1e-9) - atol, (KINDS[i // n_each], G, f[i], ref)
            assert f[i] <= ref * (1 + 1e-9) + atol, (KINDS[i // n_each], G, f[i], ref)
            # f is the objective at the returned zero-point (accumulated by increments: absolute error ~1e-16)
            u = x.astype(np.float64) + z[i]
            e = u - np.clip(np.round(u), 0, L - 1)
            hn = hs[i] / hs[i].sum()
            np.testing.assert_allclose(f[i], (hn * (e * e)[np.argsort(x, kind="stable")]).sum(), rtol=1e-9,
                                       atol=1e-14)


def _surrogate_brute(x, h, L):
    """float64 minimum of NeUQI's surrogate Σ h ψ(x + Z) (ψ: u² below -½, ¼ between, (u - L + 1)² above: continuous),
    by evaluating every interval between the 2G events in closed form: an independent check of the walk."""
    ev = np.unique(np.concatenate([-0.5 - x, (L - 0.5) - x]))
    los = np.concatenate([[-np.inf], ev])
    his = np.concatenate([ev, [np.inf]])

    def g(z):
        u = x + z
        return float(np.sum(h * np.where(u < -0.5, u ** 2, np.where(u > L - 0.5, (u - L + 1) ** 2, 0.25))))

    best = np.inf
    for lo, hi in zip(los, his):
        mid = lo + 1.0 if not np.isfinite(hi) else (hi - 1.0 if not np.isfinite(lo) else 0.5 * (lo + hi))
        u = x + mid
        low, high = u < -0.5, u > L - 0.5
        a = h[low].sum() + h[high].sum()
        b = (h[low] * x[low]).sum() + (h[high] * (x[high] - (L - 1))).sum()
        for z in (lo, hi, -b / a if a > 0 else mid):
            if np.isfinite(z):
                best = min(best, g(min(max(z, lo), hi)))
    return best, g


def _sorted_case(rng, kind, G, bits):
    """An adversarial group (test_zeropoint's kinds) sorted, shifted to start at 0, float64, with Σ h > 0."""
    x, h = _case(rng, kind, G, bits)
    o = np.argsort(x, kind="stable")
    x = x[o].astype(np.float64)
    h = h[o].astype(np.float64)
    return x - x[0], (h if h.sum() > 0 else np.ones_like(h))


def _prefix(x, h):
    """(Ph, Phx): the walk's prefix sums of h and h·x, from 0 (float64 numpy, independent of the kernel's own)."""
    return np.concatenate([[0.0], np.cumsum(h)]), np.concatenate([[0.0], np.cumsum(h * x)])


@pytest.mark.parametrize("bits", [2, 4])
def test_surrogate_walk_any_start_matches_brute_force(bits):
    """The surrogate's walk from prefix sums (one per group, any scale) gives the same Z₁ from every start
    (from -inf, just below Z₁, far below it, and above it, where it must fall back) and Z₁ minimises the
    surrogate like an interval-by-interval float64 brute force."""
    rng = np.random.default_rng(7 + bits)
    L = float(1 << bits)
    for kind in KINDS:
        for _ in range(6):
            x, h = _sorted_case(rng, kind, int(rng.integers(1, 140)), bits)
            s = float(rng.uniform(0.3, 3.0))
            Ph, Phx = _prefix(x, h)  # prefix sums of h·xr with xr = x here
            xs = x / s
            z1 = fast_cpu._surrogate(xs, Ph, Phx, 1.0 / s, L, -np.inf)[0]
            for start in (z1 - 0.01, z1 - 1.5, z1 - 40.0, z1 + 0.3, z1 + 5.0):
                assert fast_cpu._surrogate(xs, Ph, Phx, 1.0 / s, L, start)[0] == z1, (kind, start)
            gmin, g = _surrogate_brute(xs, h, L)
            assert g(z1) <= gmin * (1 + 1e-9) + 1e-12 * (1 + float(h.sum())), (kind, g(z1), gmin)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lower_bound_is_below_the_exact_minimum(bits):
    """The pruning bound (the surrogate's minimum less ¼ per element) never exceeds min over Z of Σ h e² (float64
    brute force over every breakpoint), at scales from heavy clipping to none, and equals the surrogate's
    minimum less ¼·Σh (so it is as tight as that: a bound loosened to the clipping distance fails the last
    check, one without the ¼ the first)."""
    rng = np.random.default_rng(31 + bits)
    L = float(1 << bits)
    clipping = 0
    for kind in KINDS:
        for _ in range(4):
            x, h = _sorted_case(rng, kind, int(rng.integers(2, 130)), bits)
            Ph, Phx = _prefix(x, h)
            span = max(float(x[-1]), 1e-6)
            for s in span / (L - 1) * np.array([1.0, 0.6, 0.3, 0.1]):  # the Min-Max scale down to strong clipping
                xs = x / s
                lb, z1 = fast_cpu._lower_bound(xs, h, L, Ph, Phx, 1.0 / s, -np.inf)
                exact = brute_force(xs, h, bits) * float(h.sum())  # brute_force normalises h
                assert lb <= exact * (1 + 1e-9) + 1e-12 * float(h.sum()), (kind, s, lb, exact)
                gmin, _ = _surrogate_brute(xs, h, L)
                np.testing.assert_allclose(lb, gmin - 0.25 * float(h.sum()), rtol=1e-9, atol=1e-9 * float(h.sum()))
                clipping += lb > 0.05 * exact
    assert clipping > 20  # the bound is not trivially 0 on these cases


def test_stage_a_threshold_only_skips_what_cannot_win():
    """_stage_a's thr: f is exact whenever it is <= thr; when the minimum is above thr, so is what it returns."""
    rng = np.random.default_rng(11)
    for bits in (2, 3, 4):
        L = float(1 << bits)
        for kind in ("heavy", "skewed_h", "h_zeros", "offset"):
            for _ in range(10):
                x, h = _case(rng, kind, 128, bits)
                o = np.argsort(x, kind="stable")
                x = (x[o] - x[o][0]).astype(np.float64) / float(rng.uniform(0.5, 4.0))
                h = h[o].astype(np.float64) + 1e-3
                Ph, Phx = _prefix(x, h)
                wsf, wsi = np.empty(4 * 128 + 400), np.empty(128, np.int64)  # the sizes _stage_a documents
                args = (x, h, Ph[-1], L, wsf, wsi, fast_cpu._surrogate(x, Ph, Phx, 1.0, L, -np.inf)[0])
                z, f = fast_cpu._stage_a(*args, np.inf)
                for thr in (f * 0.5, f * (1 - 1e-6), f, f * 1.01, f * 3):
                    zt, ft = fast_cpu._stage_a(*args, thr)
                    if f <= thr:
                        assert ft == f and zt == z
                    else:
                        assert ft > thr


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("gs", [32, 128, -1])
def test_init_params_matches_reference(bits, gs):
    """Per group the fast path's loss equals the torch reference's within float rounding or is lower, and the
    sum is never worse. (Ragged last group for 32/128; h with zeros; constant groups.)"""
    W = _heavy(12, 328, seed=bits * 3 + (gs % 7))
    W[0, :32] = 0.0
    W[1, 32:64] = 0.37
    h = _hdiag(328, seed=bits)
    h[::5] = 0.0
    ng = n_groups(328, gs)
    for method in ("neuqi", "mse"):
        hd = h if method == "neuqi" else None
        fs, fz = init_params(W, bits, gs, method, hdiag=h, impl="numba")
        rs, rz = init_params(W, bits, gs, method, hdiag=h, impl="reference")
        assert fs.shape == fz.shape == (12, ng) and fs.dtype == fz.dtype == torch.float32
        assert torch.all(fs > 0) and torch.all(torch.isfinite(fz))
        lf = group_loss(W, fs, fz, bits, gs, hd)
        lr = group_loss(W, rs, rz, bits, gs, hd)
        mm = group_loss(W, *init_params(W, bits, gs, "minmax"), bits, gs, hd)
        assert torch.all(lf <= lr * (1 + 1e-4) + 1e-30), (method, (lf / lr).max())
        assert lf.sum() <= lr.sum() * (1 + 1e-7)
        assert torch.all(lf <= mm * (1 + 1e-5) + 1e-30)


def test_real_shaped_layer_loss_ratio():
    W = _heavy(64, 640, seed=1)
    h = _hdiag(640, seed=1)
    for bits in (2, 3, 4):
        lf = group_loss(W, *init_params(W, bits, 128, "neuqi", hdiag=h), bits, 128, h)
        lr = group_loss(W, *init_params(W, bits, 128, "neuqi", hdiag=h, impl="reference"), bits, 128, h)
        ratio = lf / lr
        assert ratio.max() <= 1 + 1e-4, ratio.max()
        assert lf.sum() <= lr.sum() * (1 + 1e-7)
        assert (ratio - 1).abs().median() < 1e-5  # the same optimum, not merely a close one


def test_pruning_threads_chunks_and_determinism():
    W = _heavy(16, 512, seed=3)
    h = _hdiag(512, seed=3)
    from neuqi_export.quant.params import _prep
    for bits in (2, 4):
        L = 1 << bits
        ws, hs, _, s0, _ = _prep(W.reshape(-1, 128), h.reshape(4, 128).repeat(16, 1), L)
        a = fast_cpu.search_scales(ws, hs, s0, bits, 64, 16, 2048, prune=True)
        b = fast_cpu.search_scales(ws, hs, s0, bits, 64, 16, 2048, prune=False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # the lower-bound pruning is exact
    base = init_params(W, 3, 128, "neuqi", hdiag=h)
    torch.set_num_threads(2)
    try:
        two = init_params(W, 3, 128, "neuqi", hdiag=h)  # split over 2 Python threads
    finally:
        torch.set_num_threads(1)
    small = init_params(W, 3, 128, "neuqi", hdiag=h, chunk_elems=300)
    again = init_params(W, 3, 128, "neuqi", hdiag=h)
    for other in (two, small, again):
        assert torch.equal(base[0], other[0]) and torch.equal(base[1], other[1])


def test_impl_option(monkeypatch):
    W = _heavy(4, 128, seed=5)
    with pytest.raises(UserError, match="impl"):
        init_params(W, 3, 64, "neuqi", impl="cuda")
    ref = init_params(W, 3, 64, "neuqi", impl="reference")
    monkeypatch.setattr(fast_cpu, "HAVE_NUMBA", False)
    with pytest.raises(UserError, match="numba"):
        init_params(W, 3, 64, "neuqi", impl="numba")
    auto = init_params(W, 3, 64, "neuqi")  # without numba: the torch path
    assert torch.equal(auto[0], ref[0]) and torch.equal(auto[1], ref[1])
    assert params.IMPLS == ("auto", "reference", "numba", "triton")
