"""The numba kernel for neuqi_int (neuqi_export/quant/fast_cpu_int.py) against a float64 brute force over every
integer zero-point and against the torch reference path of init_params (impl="reference")."""
import numpy as np
import pytest
import torch

from neuqi_export.quant import fast_cpu_int, params
from neuqi_export.quant.params import _DEFAULTS, _int_fractions, _prep, group_loss, init_params


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _weights(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    h = torch.rand(cols, generator=g) ** 3 * 4 + 0.01
    return W, h


def _f64_loss(w, h, s, Z, L):
    u = w / s + Z
    e = u - np.clip(np.rint(u), 0, L - 1)
    return float((h * e * e).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_best_integer_zero_is_the_brute_force_argmin(bits):
    """The O(log G) forward difference from prefix sums finds the same f as trying every Z in 0..L-1."""
    L = 1 << bits
    rng = np.random.default_rng(bits)
    for trial in range(200):
        G = int(rng.choice([5, 32, 128]))
        w = np.sort(rng.standard_t(3, G) * 0.02)
        if trial % 4 == 0:
            w = np.sort(np.abs(w))  # all positive: the optimum clips at Z = 0
        h = rng.random(G) ** 3 + (0.0 if trial % 3 else 1e-3)
        h /= h.sum()
        PH = np.concatenate([[0.0], np.cumsum(h)])
        PHW = np.concatenate([[0.0], np.cumsum(h * w)])
        s0 = (w[-1] - w[0]) / (L - 1)
        for s in s0 * rng.uniform(0.05, 1.3, 4):
            z = fast_cpu_int._best_int_zero(w, PH, PHW, s, float(L - 1))
            assert z == int(z) and 0 <= z <= L - 1
            brute = min(_f64_loss(w, h, s, Z, L) for Z in range(L))
            assert _f64_loss(w, h, s, z, L) <= brute * (1 + 1e-10), (trial, s, z)  # float64 near-ties only


@pytest.mark.parametrize("bits", [2, 4])
def test_search_equals_a_float64_brute_force_over_the_grid(bits):
    """The whole search redone in float64 with every integer Z of every candidate scale (Min-Max point, coarse,
    then fine around the best coarse scale; strict < so the earliest candidate wins): the same loss."""
    L = 1 << bits
    W, h = _weights(6, 128, seed=10 + bits)
    ws, hs, wmin, s0, _ = _prep(W, h.reshape(1, 128).repeat(6, 1), L)
    coarse, fine = _int_fractions(dict(_DEFAULTS))
    s, z = fast_cpu_int.search_scales_int(ws, hs, s0, bits, coarse, fine)
    for g in range(6):
        w, hh, s0g = ws[g].double().numpy(), hs[g].double().numpy(), np.float32(s0[g])

        def best_at(c):
            return min((_f64_loss(w, hh, c, Z, L) * c * c, Z) for Z in range(L))

        bs = float(s0g)
        best = _f64_loss(w, hh, bs, float(np.rint(np.float32(-ws[g, 0]) / s0g)), L) * bs * bs
        for fr in coarse:
            c = float(np.float32(s0g * np.float32(fr)))
            loss, _ = best_at(c)
            if loss < best:
                best, bs = loss, c
        s_c = np.float32(bs)
        for fr in fine:
            c = float(np.float32(s_c + np.float32(s0g * np.float32(fr))))
            if c > 0 and best_at(c)[0] < best:
                best = best_at(c)[0]
        got = _f64_loss(w, hh, float(s[g]), float(z[g]), L) * float(s[g]) ** 2
        assert abs(got - best) <= 1e-9 * best, (g, got, best)


CASES = [(16, 256, gs, bits) for gs in (128, 32) for bits in (2, 3, 4)] + [(8, 256, 128, 8), (8, 200, 64, 3),
                                                                           (8, 200, -1, 2)]


@pytest.mark.parametrize("rows,cols,gs,bits", CASES)
def test_matches_the_torch_path(rows, cols, gs, bits):
    W, h = _weights(rows, cols, seed=rows + cols + gs + bits)
    if cols == 200:  # an all-zero group, a constant group, zeros in h
        W[0, :64] = 0.0
        W[1, 64:128] = 0.37
        h[::5] = 0.0
    sr, zr = init_params(W, bits, gs, "neuqi_int", hdiag=h, impl="reference")
    sf, zf = init_params(W, bits, gs, "neuqi_int", hdiag=h, impl="numba")
    assert torch.isfinite(sf).all() and torch.isfinite(zf).all()
    assert torch.equal(zf, torch.round(zf))  # integer zero-points
    lr, lf = group_loss(W, sr, zr, bits, gs, h), group_loss(W, sf, zf, bits, gs, h)
    assert torch.all((lf - lr).abs() <= 1e-5 * lr + 1e-30), float(((lf - lr).abs() / lr.clamp_min(1e-30)).max())
    assert float(lf.sum()) <= float(lr.sum()) * (1 + 1e-6)
    same = float(((sr == sf) & (zr == zf)).double().mean())
    # Groups whose (s, z) differ from the torch path's: measured 0 in every case but 16x256 g32 3-bit and
    # 8x200 g64 3-bit (1 of 128, 1 of 32: float32 near-ties whose losses agree within the 1e-5 above), the same
    # with 1 and 2 threads (`pytest -s tests/neuqi_export/test_fast_cpu_int.py -k test_matches_the_torch_path`
    # with a print of the count). At most 2: one more near-tie than measured, for another platform's float32
    # summation order (the old bound, same >= 0.9, let 3 of 32 and 12 of 128 groups differ).
    differ = int(((sr != sf) | (zr != zf)).sum())
    assert differ <= 2, (differ, same)


def test_dense_grid_and_pruning():
    W, h = _weights(8, 256, seed=3)
    for bits in (2, 4):
        sr, zr = init_params(W, bits, 128, "neuqi_int", hdiag=h, impl="reference", int_grid="dense")
        sf, zf = init_params(W, bits, 128, "neuqi_int", hdiag=h, impl="numba", int_grid="dense")
        lr, lf = group_loss(W, sr, zr, bits, 128, h), group_loss(W, sf, zf, bits, 128, h)
        assert torch.all((lf - lr).abs() <= 1e-5 * lr)
    # the clipped-elements bound only skips candidates that cannot win: identical results without it
    ws, hs, _, s0, _ = _prep(W.reshape(-1, 128), h.reshape(2, 128).repeat(8, 1), 16)
    coarse, fine = _int_fractions(dict(_DEFAULTS))
    a = fast_cpu_int.search_scales_int(ws, hs, s0, 4, coarse, fine, prune=True)
    b = fast_cpu_int.search_scales_int(ws, hs, s0, 4, coarse, fine, prune=False)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_auto_uses_the_kernel_on_cpu(monkeypatch):
    calls = []
    real = fast_cpu_int.search_scales_int
    monkeypatch.setattr(params._fast_int, "search_scales_int", lambda *a, **k: calls.append(1) or real(*a, **k))
    W, h = _weights(4, 128, seed=1)
    init_params(W, 3, 64, "neuqi_int", hdiag=h)
    assert calls
    calls.clear()
    init_params(W, 3, 64, "neuqi_int", hdiag=h, impl="reference")
    assert not calls
