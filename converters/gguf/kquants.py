"""Refits: put a master tensor on a GGUF lattice the master's parameters do not fit, minimising
the same diag(H)-weighted error NeUQI minimises, Σ_j h_j (w_j − ŵ_j)², with w = the master's
dequantized weights (the exact record) and h = the master's hdiag.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import chunked
from .exact import PackedTensor, weighted_error
from .packers import QK


def _solve_affine(x, h, q):
    """Weighted least squares (d, m) for x ≈ d*q + m per block (last axis); falls back to mean for flat codes."""
    hs = h.sum(-1)
    hs = np.where(hs > 0, hs, 1.0)
    qm = (h * q).sum(-1) / hs
    xm = (h * x).sum(-1) / hs
    cov = (h * (q - qm[..., None]) * (x - xm[..., None])).sum(-1)
    var = (h * (q - qm[..., None]) ** 2).sum(-1)
    d = np.where(var > 0, cov / np.where(var > 0, var, 1), 0.0)
    d = np.maximum(d, 0.0)
    return d, xm - d * qm


def fit_affine_blocks(x: np.ndarray, h: np.ndarray, levels: int, n_scales: int = 24):
    """Per block (last axis) of x, find fp16 (d, m) and codes 0..levels-1 for x ≈ d*q + m.

    A grid of scales around the min-max scale; for each, the weighted-optimal offset by alternating
    code rounding and the closed-form mean, then a joint least-squares polish on the best codes, and
    the codes re-rounded on the fp16-rounded (d, m). Vectorised over the blocks of a chunk, chunks on threads.
    Returns (q uint8, d float16, m float16, ŵ float64).
    """
    x = np.asarray(x, np.float64)
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    hb = np.broadcast_to(np.asarray(h, np.float64), x2.shape)  # a view: chunks slice it, nothing is copied
    parts = chunked.map_row_chunks(lambda r: _fit_affine_rows(x2[r], hb[r], levels, n_scales), x2.shape[0],
                                   x2[0].size)
    q, d, m, w_hat = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return q.reshape(x.shape), d.reshape(x.shape[:-1]), m.reshape(x.shape[:-1]), w_hat.reshape(x.shape)


def _fit_affine_rows(x: np.ndarray, h: np.ndarray, levels: int, n_scales: int):
    """fit_affine_blocks on blocks x (..., B) float64, h of x's shape."""
    lo, hi = x.min(-1), x.max(-1)
    s0 = (hi - lo) / (levels - 1)
    hs = np.where(h.sum(-1) > 0, h.sum(-1), 1.0)
    best_err = np.full(x.shape[:-1], np.inf)
    best_q = np.zeros(x.shape, np.float64)
    for t in np.linspace(0.5, 1.05, n_scales):
        s = np.where(s0 > 0, s0 * t, 1.0)
        m = lo.copy()
        for _ in range(3):
            q = _round_clamp((x - m[..., None]) / s[..., None], 0, levels - 1)
            m = (h * (x - s[..., None] * q)).sum(-1) / hs
        err = (h * (x - s[..., None] * q - m[..., None]) ** 2).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], q, best_q)
    d, m = _solve_affine(x, h, best_q)
    d16, m16 = d.astype(np.float16), m.astype(np.float16)
    df, mf = d16.astype(np.float64), m16.astype(np.float64)
    q = np.clip(np.round((x - mf[..., None]) / np.where(df > 0, df, 1)[..., None]), 0, levels - 1)
    q = np.where(df[..., None] > 0, q, 0)
    w_hat = df[..., None] * q + mf[..., None]
    return q.astype(np.uint8), d16, m16, w_hat


def refit_legacy(gtype, w: np.ndarray, hdiag: np.ndarray | None, why: str) -> PackedTensor:
    """Q4_1 / Q5_1 (gtype: its row in types.py) from master dequantized weights (rows, in), in % 32 == 0."""
    rows, n = w.shape
    h = np.ones(n) if hdiag is None else np.asarray(hdiag, np.float64)
    xb = w.reshape(rows, n // QK, QK)
    q, d16, m16, _ = fit_affine_blocks(xb, h.reshape(1, n // QK, QK), gtype.levels)
    data = gtype.pack((d16, m16), q.reshape(rows, n))
    w_new = np.repeat(d16.astype(np.float32), QK, 1) * q.reshape(rows, n).astype(np.float32) + np.repeat(m16.astype(np.float32), QK, 1)
    err, rel = weighted_error(w, w_new, h)
    return PackedTensor(data, gtype.name, False, err, rel, f"refit ({why})")


# ------------------------------------------------------------------------------------------------
# K-quants: 256-weight super-blocks of 16/32-weight sub-blocks; each sub-block scale (and min) is a
# small integer times one fp16 super-scale per super-block. The master's per-group (s, Z) are not
# on that lattice, so the tensor is refit:
#   1. per sub-block, a continuous start: the master's own (s, m = -s*Z) where its groups cover whole
#      sub-blocks and its bits fit, else a diag(H)-weighted affine / symmetric fit of the weights;
#   2. per super-block, a small grid of fp16 super-scales (d, dmin) around max(sub-scale)/int_max;
#      for each, every sub-block takes the best of round(s/d) ± 1 (and round(-m/dmin) ± 1) with its
#      codes re-rounded, judged by Σ h (w − ŵ)²; the best grid point wins;
#   3. a weighted least-squares polish of (d, dmin) for the chosen integers and codes, kept only if
#      it lowers the error after fp16 rounding and code re-rounding.
# Everything is vectorised over all super-blocks of a tensor.

from .packers import QK_K  # noqa: E402


@dataclass(frozen=True)
class KSpec:
    """A K type's super-block as the fit sees it (each K type's row in types.py holds one)."""

    sub_block: int  # weights per sub-block scale (and min)
    levels: int  # codes 0..levels-1
    seed_bits: int  # the widest master codes whose (s, Z) seed the sub-block start
    imax: int  # largest integer sub-scale / min (Q3_K: signed, -imax-1..imax)
    with_min: bool  # affine sub-blocks d*sc*q - dmin*mn (False: symmetric d*sc*v, Q3_K)


_F16_TINY = 6.2e-5  # keep super-scales in the normal fp16 range where possible


def _f16(x):
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float64).astype(np.float16).astype(np.float64)


def _round_clamp(v, lo, hi):
    """clip(round(v), lo, hi) in place on the temporary v (np.clip's Python wrapper costs more than the work)."""
    np.rint(v, out=v)
    np.maximum(v, lo, out=v)
    return np.minimum(v, hi, out=v)


def _round_codes_affine(x, s, m, levels):
    """codes 0..levels-1 for x ≈ s*q + m (s, m per sub-block; s == 0 -> code 0)."""
    safe = np.where(s > 0, s, 1.0)
    q = _round_clamp((x - m[..., None]) / safe[..., None], 0, levels - 1)
    return np.where(s[..., None] > 0, q, 0.0)


def _round_codes_sym(x, s):
    """codes -4..3 for x ≈ s*v (Q3_K)."""
    safe = np.where(s != 0, s, 1.0)
    v = _round_clamp(x / safe[..., None], -4, 3)
    return np.where(s[..., None] != 0, v, 0.0)


def _sub_err(x, h, w_hat):
    return (h * (x - w_hat) ** 2).sum(-1)


def _sym_start(x, h):
    """Per sub-block weighted best s for x ≈ s*v, v in -4..3 (grid on the map of the largest |x| to -4)."""
    imax = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, imax[..., None], -1)[..., 0]
    best_s = np.zeros(x.shape[:-1])
    best_e = np.full(x.shape[:-1], np.inf)
    for t in np.linspace(0.6, 1.3, 15):
        s_try = np.where(vmax != 0, -vmax / (4 * t), 0.0)
        v = _round_codes_sym(x, s_try)
        den = (h * v * v).sum(-1)
        s = np.where(den > 0, (h * x * v).sum(-1) / np.where(den > 0, den, 1), 0.0)
        v = _round_codes_sym(x, s)
        e = _sub_err(x, h, s[..., None] * v)
        better = e < best_e
        best_e, best_s = np.where(better, e, best_e), np.where(better, s, best_s)
    return best_s


def _choose_ints(x, h, s_t, m_t, d, dm, levels, imax, with_min):
    """For super-scale candidates d, dm (per super-block), the best integer (sc, mn) per sub-block, ±1 around rounding."""
    dd = np.where(d > 0, d, 1.0)[..., None]
    base_sc = np.round(s_t / dd)
    best = None
    if with_min:
        dmm = np.where(dm > 0, dm, 1.0)[..., None]
        base_mn = np.clip(np.round(-m_t / dmm), 0, imax)
        trials = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    else:
        base_mn = np.zeros_like(base_sc)
        trials = [(a, 0) for a in (-1, 0, 1)]
    for a, b in trials:
        if with_min:
            sc = np.clip(base_sc + a, 0, imax)
            mn = np.clip(base_mn + b, 0, imax)
            s, m = d[..., None] * sc, -dm[..., None] * mn
            q = _round_codes_affine(x, s, m, levels)
            w_hat = s[..., None] * q + m[..., None]
        else:
            sc = np.clip(base_sc + a, -imax - 1, imax)
            mn = base_mn
            s = d[..., None] * sc
            q = _round_codes_sym(x, s)
            w_hat = s[..., None] * q
        e = _sub_err(x, h, w_hat)
        if best is None:
            best = [e, sc, mn, q]
        else:
            better = e < best[0]
            best = [np.where(better, e, best[0]), np.where(better, sc, best[1]), np.where(better, mn, best[2]),
                    np.where(better[..., None], q, best[3])]
    return best  # err (S, nsub), sc, mn, q (S, nsub, B)


def _polish(x, h, sc, mn, q, with_min):
    """Weighted LS super-scales for fixed integers and codes: ŵ = d*(sc*q) - dm*mn (or d*sc*q)."""
    a = sc[..., None] * q
    if not with_min:
        den = (h * a * a).sum((-1, -2))
        return np.where(den > 0, (h * x * a).sum((-1, -2)) / np.where(den > 0, den, 1), 0.0), np.zeros(den.shape)
    b = -np.broadcast_to(mn[..., None], x.shape)
    saa, sbb, sab = (h * a * a).sum((-1, -2)), (h * b * b).sum((-1, -2)), (h * a * b).sum((-1, -2))
    sax, sbx = (h * a * x).sum((-1, -2)), (h * b * x).sum((-1, -2))
    det = saa * sbb - sab * sab
    ok = np.abs(det) > 1e-30 * np.maximum(saa * sbb, 1e-300)
    dsafe = np.where(ok, det, 1.0)
    d = np.where(ok, (sax * sbb - sbx * sab) / dsafe, np.where(saa > 0, sax / np.where(saa > 0, saa, 1), 0.0))
    dm = np.where(ok, (sbx * saa - sax * sab) / dsafe, 0.0)
    return np.maximum(d, 0.0), np.maximum(dm, 0.0)


def search_super_scales(x, hh, s_t, m_t, d0, dm0, levels: int, imax: int, with_min: bool):
    """Super-block (d, dmin) on a ±8% grid around (d0, dm0), integer sub-scales/mins and codes for each, then a
    least-squares polish of (d, dmin) kept where it lowers Σ h (x - x̂)². Returns (d, dm, sc, mn, q) per super-block."""
    best = None
    facs = (0.92, 1.0, 1.08)
    for fd in facs:
        for fm in (facs if with_min else (1.0,)):
            d, dm = _f16(d0 * fd), _f16(dm0 * fm)
            err, sc, mn, q = _choose_ints(x, hh, s_t, m_t, d, dm, levels, imax, with_min)
            tot = err.sum(-1)
            if best is None:
                best = [tot, d, dm, sc, mn, q]
            else:
                b = tot < best[0]
                best = [np.where(b, tot, best[0]), np.where(b, d, best[1]), np.where(b, dm, best[2]),
                        np.where(b[:, None], sc, best[3]), np.where(b[:, None], mn, best[4]), np.where(b[:, None, None], q, best[5])]
    tot, d, dm, sc, mn, q = best
    pd, pdm = _polish(x, hh, sc, mn, q, with_min)
    pd, pdm = _f16(pd), _f16(pdm)
    s, m = pd[:, None] * sc, -pdm[:, None] * mn
    if with_min:
        q2 = _round_codes_affine(x, s, m, levels)
        w2 = s[..., None] * q2 + m[..., None]
    else:
        q2 = _round_codes_sym(x, s)
        w2 = s[..., None] * q2
    b = _sub_err(x, hh, w2).sum(-1) < tot
    return np.where(b, pd, d), np.where(b, pdm, dm), sc, mn, np.where(b[:, None, None], q2, q)


def fit_k_params(w: np.ndarray, h: np.ndarray, spec: KSpec, seed: tuple[np.ndarray, np.ndarray] | None = None):
    """K-type (Q2_K..Q5_K, spec: its KSpec) block parameters for w (rows, n), n % 256 == 0, minimising Σ h (w - ŵ)².

    Returns (params, q): params = (sc, mn, d16, dm16) for the type's pack (types.py; sc/mn int64 (rows, n/B),
    d16/dm16 float16 (rows, n/256)); q uint8 (rows, n) codes 0..levels-1 (Q3_K: the stored code, value + 4)."""
    parts = chunked.map_row_chunks(lambda r: _fit_k_rows(w[r], h, spec, None if seed is None else (seed[0][r], seed[1][r])),
                           w.shape[0], w.shape[1])
    params = tuple(np.concatenate([p[0][i] for p in parts]) for i in range(4))
    return params, np.concatenate([p[1] for p in parts])


def _fit_k_rows(w: np.ndarray, h: np.ndarray, spec: KSpec, seed):
    """fit_k_params on a block of rows."""
    B, levels, imax, with_min = spec.sub_block, spec.levels, spec.imax, spec.with_min
    rows, n = w.shape
    nsup = n // QK_K
    nsub = QK_K // B
    x = np.asarray(w, np.float64).reshape(rows * nsup, nsub, B)
    hh = np.broadcast_to(np.asarray(h, np.float64).reshape(1, nsup, nsub, B), (rows, nsup, nsub, B)).reshape(x.shape)
    # 1. continuous start per sub-block
    if with_min:
        if seed is not None:
            s_t, m_t = (v.reshape(rows * nsup, nsub) for v in seed)
        else:
            _, d16, m16, _ = _fit_affine_rows(x, hh, levels, 24)
            s_t, m_t = d16.astype(np.float64), m16.astype(np.float64)
        m_t = np.minimum(m_t, 0.0)  # the format's offset is -dmin*mn <= 0
    else:
        s_t = _sym_start(x, hh)
        m_t = np.zeros_like(s_t)
    # 2. grid over the super-scales
    if with_min:
        d0 = s_t.max(-1) / imax
        dm0 = (-m_t).max(-1) / imax
    else:
        i = np.abs(s_t).argmax(-1)
        smax = np.take_along_axis(s_t, i[..., None], -1)[..., 0]
        d0 = np.abs(smax) / np.where(smax < 0, imax + 1, imax)
        dm0 = np.zeros_like(d0)
    d, dm, sc, mn, q = search_super_scales(x, hh, s_t, m_t, d0, dm0, levels, imax, with_min)
    params = (sc.reshape(rows, nsup * nsub).astype(np.int64), mn.reshape(rows, nsup * nsub).astype(np.int64),
              d.astype(np.float16).reshape(rows, nsup), dm.astype(np.float16).reshape(rows, nsup))
    q = q.reshape(rows, n) + (0 if with_min else 4)
    return params, q.astype(np.uint8)


def fit_k(gtype, w: np.ndarray, h: np.ndarray, seed: tuple[np.ndarray, np.ndarray] | None = None):
    """Refit w (rows, n), n % 256 == 0, to K type gtype (its row in types.py). Returns (packed bytes, ŵ float32 as
    the runtime reads it)."""
    import gguf

    params, q = fit_k_params(w, h, gtype.k, seed)
    data = gtype.pack(params, q)
    return data, gguf.quants.dequantize(data, gguf.GGMLQuantizationType[gtype.name])


def refit_k(gtype, w: np.ndarray, hdiag: np.ndarray | None, bits: int, group_size: int,
            scale: np.ndarray | None = None, zero: np.ndarray | None = None) -> PackedTensor:
    """A master linear (dequantized w, rows x in, in % 256 == 0) refit to K type gtype (its row in types.py).

    scale/zero (rows, n_groups): the master's parameters; they seed the sub-block (s, m) when its
    groups cover whole sub-blocks and its bits fit the type's codes.
    """
    rows, n = w.shape
    if n % QK_K:
        raise ValueError(f"input dim {n} is not a multiple of {QK_K}")
    h = np.ones(n) if hdiag is None else np.asarray(hdiag, np.float64)
    B, seed_bits, with_min = gtype.k.sub_block, gtype.k.seed_bits, gtype.k.with_min
    seed = None
    if with_min and scale is not None and bits <= seed_bits and group_size % B == 0:
        gidx = (np.arange(n // B) * B) // group_size
        s = np.asarray(scale, np.float64)[:, gidx]
        seed = (s, -s * np.asarray(zero, np.float64)[:, gidx])
    data, w_new = fit_k(gtype, w, h, seed)
    err, rel = weighted_error(w, w_new, h)
    return PackedTensor(data, gtype.name, False, err, rel, "K-quant refit (diag-H)")
