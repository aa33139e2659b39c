"""numba kernels for GPTQ's column loop inside one block of columns, on CPU (the torch loop is the reference).

Inside a block every row is independent: column i of row r is rounded, its error e = (w − ŵ)/U[i,i] is
recorded and spread over the row's later columns (w_j −= e·U[i,j]). So the block is one compiled loop per
row, rows split over threads, instead of ~10 small tensor ops per column issued from Python (149,760
columns for SmolLM2, each op dispatched over all rows). The arithmetic is the torch loop's, operation for
operation in float32 (no fused multiply-add, no reassociation), so the codes are bit-identical to it
(tested on every grid kind); the cross-block update stays one torch matmul.

Grids, per column of the block (its ORIGINAL index decides which parameters it uses):
- uniform: q = clamp(round(w/s + z), 0, L), ŵ = s·(q − z), (s, z) of the column's group;
- a value table per sub-block, affine in the code (v0 + step·k): q from (w − v0)/step, then the best of it
  and its two neighbours against the actual values, ties to the lower candidate; ŵ = the value;
- a value table not affine in the code (IQ4_NL): the nearest value, ties to the lower code.
"""
from __future__ import annotations

import numpy as np

try:  # optional dependency, as for the NeUQI kernels
    from numba import njit
    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised when numba is absent
    HAVE_NUMBA = False

from .threads import run_ranges

if HAVE_NUMBA:
    @njit(cache=True, fastmath=False, nogil=True)
    def _spread(WT, U1, i, err, a, b):
        """Later columns absorb column i's error, in float32: w_j −= fl(err · U[i, j]) for rows [a, b). WT is the
        block transposed (columns, rows): the inner loop runs over contiguous rows and is vectorised."""
        for j in range(i + 1, WT.shape[0]):
            u = U1[i, j]
            for r in range(a, b):
                WT[j, r] = WT[j, r] - np.float32(err[r] * u)

    @njit(cache=True, fastmath=False, nogil=True)
    def _block_uniform(WT, U1, gidx, scale, zero, L, codes, E, a, b):
        """WT (bs, rows) float32, the block transposed (modified), U1 (bs, bs) float32, gidx (bs,) group of each
        column, scale/zero (rows, ngroups) float32, L = 2^b − 1 (float32); rows [a, b) only. Writes codes (bs,
        rows) uint8 and E (bs, rows) errors."""
        zero32 = np.float32(0.0)
        for i in range(WT.shape[0]):
            d = U1[i, i]
            g = gidx[i]
            for r in range(a, b):
                s = scale[r, g]
                z = zero[r, g]
                w = WT[i, r]
                q = np.float32(np.round(np.float32(np.float32(w / s) + z)))
                q = min(max(q, zero32), L)
                w_hat = np.float32(s * np.float32(q - z))
                codes[i, r] = np.uint8(q)
                E[i, r] = np.float32(np.float32(w - w_hat) / d)
            _spread(WT, U1, i, E[i], a, b)

    @njit(cache=True, fastmath=False, nogil=True)
    def _block_table(WT, U1, sidx, values, affine, codes, E, a, b):
        """As _block_uniform on a value table: values (rows, nsub, K) float32, sidx (bs,) sub-block of each
        column; affine: the values are v0 + step·k (nearest by division), else nearest by a full scan."""
        K = values.shape[2]
        for i in range(WT.shape[0]):
            d = U1[i, i]
            for r in range(a, b):
                v = values[r, sidx[i]]
                w = WT[i, r]
                if affine:
                    step = np.float32(v[1] - v[0])
                    q0 = np.float32(np.round(np.float32(np.float32(w - v[0]) / step))) if step != 0 else np.float32(0)
                    c = int(min(max(q0, np.float32(0)), np.float32(K - 1)))
                    best, bd = max(c - 1, 0), abs(np.float32(w - v[max(c - 1, 0)]))
                    for cand in (c, min(c + 1, K - 1)):
                        dd = abs(np.float32(w - v[cand]))
                        if dd < bd:
                            best, bd = cand, dd
                else:
                    best, bd = 0, abs(np.float32(w - v[0]))
                    for cand in range(1, K):
                        dd = abs(np.float32(w - v[cand]))
                        if dd < bd:
                            best, bd = cand, dd
                codes[i, r] = np.uint8(best)
                E[i, r] = np.float32(np.float32(w - v[best]) / d)
            _spread(WT, U1, i, E[i], a, b)


def block_uniform(WT: np.ndarray, U1: np.ndarray, gidx: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                  levels: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over one block of columns on a uniform grid (codes 0..levels-1); WT is the block transposed,
    (bs, rows), modified in place; rows over threads. Returns (codes uint8, errors float32), each (bs, rows)."""
    bs, rows = WT.shape
    codes = np.empty((bs, rows), np.uint8)
    E = np.empty((bs, rows), np.float32)
    run_ranges(_block_uniform, rows, (WT, U1, gidx, scale, zero, np.float32(levels - 1), codes, E))
    return codes, E


def block_table(WT: np.ndarray, U1: np.ndarray, sidx: np.ndarray, values: np.ndarray,
                affine: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over one block of columns on per-sub-block value tables; as block_uniform."""
    bs, rows = WT.shape
    codes = np.empty((bs, rows), np.uint8)
    E = np.empty((bs, rows), np.float32)
    run_ranges(_block_table, rows, (WT, U1, sidx, values, bool(affine), codes, E))
    return codes, E
