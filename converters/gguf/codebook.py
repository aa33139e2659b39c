"""Code-book block types (Q8_0, Q4_0, Q5_0, IQ4_NL): per 32-weight block one fp16 scale d and indices q into the
type's table of values kv, w ≈ d * kv[q] (Q8_0: kv = -128..127, Q4_0: -8..7, Q5_0: -16..15, IQ4_NL: llama.cpp's
non-uniform table); fitted on the diag(H) objective Σ h (w - ŵ)² (scale grid + weighted least squares +
re-rounding, plus the reference quantizer's own scale, so the fit is never worse than it) and packed in the types'
byte layouts. Each type's table is its row's in types.py (IQ4_NL's,
llama.cpp's kvalues_iq4nl, is here)."""
from __future__ import annotations

import numpy as np

from . import chunked
from .packers import QK, pack_q4_1, pack_q5_1, pack_q8_0

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float64)


def _nearest(x, kv):
    """Index of the nearest code-book value (kv sorted ascending), ties to the lower one (searchsorted on the
    midpoints); uniform integer books by rounding, integer books (IQ4_NL) by a table on floor(2x)."""
    if np.all(np.diff(kv) == 1):
        return np.clip(np.rint(x - kv[0]), 0, len(kv) - 1).astype(np.intp)
    mids = (kv[1:] + kv[:-1]) / 2
    if not np.all(kv == np.rint(kv)):
        return np.searchsorted(mids.astype(x.dtype), x)
    # midpoints of integers are multiples of ½: with j = floor(2x), #(mids < x) = #(mids < j/2) + [x > j/2 ∈ mids]
    # (exact: 2x and j/2 are exact in binary floating point; 10x faster than np.searchsorted on 15 midpoints)
    lo, hi = int(2 * mids[0]) - 1, int(2 * mids[-1])
    halves = np.arange(lo, hi + 1) / 2
    below = np.searchsorted(mids, halves).astype(np.intp)
    on_mid = np.isin(halves, mids)
    with np.errstate(invalid="ignore"):
        j = np.clip(np.nan_to_num(np.floor(2 * x), nan=hi), lo, hi)  # NaN last, as searchsorted puts it
    t = j.astype(np.intp) - lo
    return below[t] + (~(x <= j / 2) & on_mid[t])  # ~(<=): NaN counts as above every midpoint


def fit_codebook_blocks(x: np.ndarray, h: np.ndarray, kv: np.ndarray, n_scales: int = 9):
    """Per block (last axis): fp16 d and indices q with x ≈ d * kv[q], minimising Σ h (x - d kv[q])².

    Candidates: the block's largest-|x| value mapped onto either end of the code book, as it is (the scale of
    llama.cpp's reference quantizers for Q4_0/Q5_0 (end kv[0]) and Q8_0 (end kv[-1]), here with nearest codes for
    the fp16 scale, so no block's error exceeds the reference's) and times a grid of factors whose codes are re-fit
    by weighted least squares for d (fp16-rounded) and re-rounded.
    Returns (q uint8, d float16). Vectorised over the blocks of a chunk, chunks on threads.
    """
    x = np.asarray(x, np.float32)
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    hb = np.broadcast_to(np.asarray(h, np.float32), x2.shape)  # a view: chunks slice it, nothing is copied
    parts = chunked.map_row_chunks(lambda r: _fit_codebook_rows(x2[r], hb[r], kv, n_scales), x2.shape[0],
                                   x2[0].size)
    return (np.concatenate([p[0] for p in parts]).reshape(x.shape),
            np.concatenate([p[1] for p in parts]).reshape(x.shape[:-1]))


def _fit_codebook_rows(x: np.ndarray, h: np.ndarray, kv: np.ndarray, n_scales: int):
    """fit_codebook_blocks on blocks x (..., B) float32, h of x's shape."""
    kvf = kv.astype(np.float32)
    imax = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, imax[..., None], -1)[..., 0]
    best_e = np.full(x.shape[:-1], np.inf, np.float32)
    best_d = np.zeros(x.shape[:-1], np.float32)

    def codes(d):
        safe = np.where(d != 0, d, 1.0).astype(np.float32)
        return _nearest(x / safe[..., None], kv)

    def consider(d16):
        nonlocal best_e, best_d
        e = (h * (x - d16[..., None] * kvf[codes(d16)]) ** 2).sum(-1)
        better = e < best_e
        best_e, best_d = np.where(better, e, best_e), np.where(better, d16, best_d)

    for end in (kv[0], kv[-1]):
        consider((vmax / np.float32(end)).astype(np.float16).astype(np.float32))  # the reference's scale
        for t in np.linspace(0.85, 1.2, n_scales):
            d = (vmax / np.float32(end * t)).astype(np.float32)
            k = kvf[codes(d)]
            den = (h * k * k).sum(-1)
            d2 = np.where(den > 0, (h * x * k).sum(-1) / np.where(den > 0, den, 1), 0.0)
            consider(d2.astype(np.float16).astype(np.float32))
    q = np.where(best_d[..., None] != 0, codes(best_d), _nearest(np.zeros_like(x), kv))
    return q.astype(np.uint8), best_d.astype(np.float16)


def pack_codebook(qtype: str, q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0 (34 B), Q4_0 (18 B), Q5_0 (22 B), IQ4_NL (18 B) blocks from indices q (rows, n) and fp16 d (rows, n/32)."""
    rows, n = q.shape
    nb = n // QK
    if qtype == "Q8_0":  # index 0..255 stands for the int8 value index - 128
        return pack_q8_0(np.asarray(q).astype(np.int16) - 128, d)
    zeros = np.zeros_like(d)
    if qtype == "Q5_0":  # Q5_1 layout minus m: d, qh, qs; code = index (value index - 16)
        b = pack_q5_1(q, d, zeros).reshape(rows, nb, 24)
        return np.concatenate([b[..., :2], b[..., 4:]], -1).reshape(rows, nb * 22)
    b = pack_q4_1(q, d, zeros).reshape(rows, nb, 20)  # Q4_0 / IQ4_NL: d, 16 bytes of nibbles
    return np.concatenate([b[..., :2], b[..., 4:]], -1).reshape(rows, nb * 18)
