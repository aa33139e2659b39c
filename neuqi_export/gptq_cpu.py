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

from .threads import run_rows

if HAVE_NUMBA:
    @njit(cache=True, fastmath=False, nogil=True)
    def _spread(Wb, U1, r, i, err):
        """Row r's later columns absorb column i's error, in float32: w_j -= fl(err · U[i, j])."""
        for j in range(i + 1, Wb.shape[1]):
            Wb[r, j] = Wb[r, j] - np.float32(err * U1[i, j])

    @njit(cache=True, fastmath=False, nogil=True)
    def _block_uniform(Wb, U1, gidx, scale, zero, L, codes, E):
        """Wb (rows, bs) float32 (modified), U1 (bs, bs) float32, gidx (bs,) group of each column, scale/zero
        (rows, ngroups) float32, L = 2^b − 1 (float32). Writes codes (rows, bs) uint8 and E (rows, bs) errors."""
        zero32 = np.float32(0.0)
        for r in range(Wb.shape[0]):
            for i in range(Wb.shape[1]):
                s = scale[r, gidx[i]]
                z = zero[r, gidx[i]]
                w = Wb[r, i]
                q = np.float32(np.round(np.float32(np.float32(w / s) + z)))
                q = min(max(q, zero32), L)
                w_hat = np.float32(s * np.float32(q - z))
                err = np.float32(np.float32(w - w_hat) / U1[i, i])
                codes[r, i] = np.uint8(q)
                E[r, i] = err
                _spread(Wb, U1, r, i, err)

    @njit(cache=True, fastmath=False, nogil=True)
    def _block_table(Wb, U1, sidx, values, affine, codes, E):
        """As _block_uniform on a value table: values (rows, nsub, K) float32, sidx (bs,) sub-block of each
        column; affine: the values are v0 + step·k (nearest by division), else nearest by a full scan."""
        K = values.shape[2]
        for r in range(Wb.shape[0]):
            for i in range(Wb.shape[1]):
                v = values[r, sidx[i]]
                w = Wb[r, i]
                if affine:
                    step = np.float32(v[1] - v[0])
                    q0 = np.float32(np.round(np.float32(np.float32(w - v[0]) / step))) if step != 0 else np.float32(0)
                    c = int(min(max(q0, np.float32(0)), np.float32(K - 1)))
                    best, bd = max(c - 1, 0), abs(np.float32(w - v[max(c - 1, 0)]))
                    for cand in (c, min(c + 1, K - 1)):
                        d = abs(np.float32(w - v[cand]))
                        if d < bd:
                            best, bd = cand, d
                else:
                    best, bd = 0, abs(np.float32(w - v[0]))
                    for cand in range(1, K):
                        d = abs(np.float32(w - v[cand]))
                        if d < bd:
                            best, bd = cand, d
                err = np.float32(np.float32(w - v[best]) / U1[i, i])
                codes[r, i] = np.uint8(best)
                E[r, i] = err
                _spread(Wb, U1, r, i, err)


def block_uniform(Wb: np.ndarray, U1: np.ndarray, gidx: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                  levels: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over one block of columns on a uniform grid (codes 0..levels-1), rows over threads; Wb is
    modified in place. Returns (codes uint8, errors float32), each (rows, bs)."""
    rows, bs = Wb.shape
    codes = np.empty((rows, bs), np.uint8)
    E = np.empty((rows, bs), np.float32)
    run_rows(_block_uniform, rows, (Wb, U1, gidx, scale, zero, np.float32(levels - 1), codes, E),
             split=(0, 3, 4, 6, 7))
    return codes, E


def block_table(Wb: np.ndarray, U1: np.ndarray, sidx: np.ndarray, values: np.ndarray,
                affine: bool) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ's loop over one block of columns on per-sub-block value tables; as block_uniform."""
    rows, bs = Wb.shape
    codes = np.empty((rows, bs), np.uint8)
    E = np.empty((rows, bs), np.float32)
    run_rows(_block_table, rows, (Wb, U1, sidx, values, bool(affine), codes, E), split=(0, 3, 5, 6))
    return codes, E
