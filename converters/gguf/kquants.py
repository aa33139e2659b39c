"""Refits: put a master tensor on a GGUF lattice the master's parameters do not fit, minimising
the same diag(H)-weighted error NeUQI minimises, Σ_j h_j (w_j − ŵ_j)², with w = the master's
dequantized weights (the exact record) and h = the master's hdiag.
"""
from __future__ import annotations

import numpy as np

from .exact import PackedTensor, weighted_error
from .packers import QK, pack_q4_1, pack_q5_1


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
    the codes re-rounded on the fp16-rounded (d, m). Vectorised over all blocks.
    Returns (q uint8, d float16, m float16, ŵ float64).
    """
    x = np.asarray(x, np.float64)
    h = np.broadcast_to(np.asarray(h, np.float64), x.shape)
    lo, hi = x.min(-1), x.max(-1)
    s0 = (hi - lo) / (levels - 1)
    hs = np.where(h.sum(-1) > 0, h.sum(-1), 1.0)
    best_err = np.full(x.shape[:-1], np.inf)
    best_q = np.zeros(x.shape, np.float64)
    for t in np.linspace(0.5, 1.05, n_scales):
        s = np.where(s0 > 0, s0 * t, 1.0)
        m = lo.copy()
        for _ in range(3):
            q = np.clip(np.round((x - m[..., None]) / s[..., None]), 0, levels - 1)
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


def refit_legacy(w: np.ndarray, hdiag: np.ndarray | None, qtype: str, why: str) -> PackedTensor:
    """Q4_1 / Q5_1 from master dequantized weights (rows, in), in % 32 == 0."""
    levels, packer = {"Q4_1": (16, pack_q4_1), "Q5_1": (32, pack_q5_1)}[qtype]
    rows, n = w.shape
    h = np.ones(n) if hdiag is None else np.asarray(hdiag, np.float64)
    xb = w.reshape(rows, n // QK, QK)
    q, d16, m16, _ = fit_affine_blocks(xb, h.reshape(1, n // QK, QK), levels)
    data = packer(q.reshape(rows, n), d16, m16)
    w_new = np.repeat(d16.astype(np.float32), QK, 1) * q.reshape(rows, n).astype(np.float32) + np.repeat(m16.astype(np.float32), QK, 1)
    err, rel = weighted_error(w, w_new, h)
    return PackedTensor(data, qtype, False, err, rel, f"refit ({why})")
