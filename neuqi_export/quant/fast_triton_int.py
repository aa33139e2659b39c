"""Optional Triton fast path for ``init_params(method="neuqi_int")`` on CUDA (NEUQI.md, "Baselines").

``neuqi_int`` restricts the zero-point to the integers 0..L-1 and searches the scale on a grid; for a fixed
scale s the best integer Z is exact (`params._int_best_zero`): with x = w/s, k = rint(x), r = x - k, the error
at integer Z is e = r + min(k+Z, 0) + max(k+Z-(L-1), 0), every element's e² is discretely convex in Z, so a
binary search on the forward difference f(Z+1) - f(Z) finds the smallest minimiser in log2(L) steps.

One kernel launch per batch runs the whole grid. A program is one warp and owns a tile of R groups x B lanes
(B = the group size rounded up to a power of two, R = max(1, 128 // B); padded lanes have w = 0, h = 0, so they
change no sum); it loads its groups once, keeps them in registers for every candidate and writes back only
(s, Z). One warp per program keeps every row reduction on warp shuffles (with 4 warps Triton's default layout
spreads a 128-lane row over all of them: a shared-memory round trip and a barrier per reduction). No sort is
needed: the groups come sorted from `params._prep` (the kernel reads min = w[0] and the pairs of the pruning).
Per candidate scale: one IEEE division per lane (`div_rn`, the torch path's bits), one rint (`cvt.rni`), then
per binary-search step one reduction of the forward difference, which is non-zero only on clipped elements:
e(Z+1) - e(Z) is 1 where k+Z <= -1 or k+Z >= L-1 and 0 elsewhere, so f(Z+1) - f(Z) = Σ_clipped h (2 e(Z) + 1)
(exactly 0 on the flat interior, as the torch path's difference of two equal sums; near ties it is the more
accurate of the two), and one final reduction for f(Z). As L is a power of two, the search interval halves
exactly at every step. ptxas for sm_90, B = 128: 60 registers, no spills, ~220 / 265 / 305 / 475 warp
instructions per group and scale at 2 / 3 / 4 / 8 bits (B = 64 / 32: two / four groups per warp, ~135 / ~90 per
group at 2 bits).

Candidates and tie rules are the torch path's: first the Min-Max point (s0, rint(-min/s0)) whose Z may lie
outside 0..L-1, then the coarse scales s0·fr in the caller's order, then the fine scales s_c + s0·fr (s_c the
best so far, a scale <= 0 is invalid); a candidate replaces the best only with a strictly smaller loss s²·f(Z).
The fractions come from the host as float32 (torch rounds a Python float scalar to float32 before the float32
multiply) and the kernel is compiled without FMA contraction, so every candidate scale has the torch path's bits.
The coarse list is scanned in reverse with `<=` into its own best, merged with the Min-Max point by strict `<`
afterwards: the same winner as the forward scan with `<` (the earliest of tied coarse scales; the Min-Max point
beats every tie).

Pruning (exact, optional): the k-th smallest and k-th largest weight of a group end at least
w[G-1-k] - w[k] - (L-1)s apart after quantization, so Σ_k h h'/(h + h') · gap² over disjoint pairs bounds the
loss of any zero-point from below; the kernel takes the 4 outermost pairs (scalars per group, ~25 instructions
a scale; all pairs prune only a little more). The bound grows as s shrinks and the best loss only falls during
the scan, so when the coarse list is ascending (scanned from the largest scale down) the first scale whose
bound exceeds the best loss of every group of the program ends the coarse pass: no smaller scale can win. The
bound carries a relative slack of 1e-3 (the float32 rounding of both sides is far below). Heavy-tailed g128
weights: the coarse pass stops after ~90% / 67% / 49% / 7% of its 64 scales at 2 / 3 / 4 / 8 bits.

float32 throughout, as the torch path; tested under Triton's CPU interpreter (TRITON_INTERPRET=1 before the
first import of `fast_triton`), where the helpers run as plain Python.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import UserError
from .fast_triton import INTERPRET, _block, _device_fn, _outputs, _rint, _rsum, _tile

_SLACK = tl.constexpr(1.0 + 1e-3)  # pruning: relative margin of the lower bound against the best loss


@_device_fn
def _int_loss(w, h, s, L: tl.constexpr, BITS: tl.constexpr):
    """Best integer Z in 0..L-1 for the scale s (R, 1) and f(Z) = Σ h e² (x units), as (R, 1) columns."""
    x = tl.div_rn(w, s)
    k = _rint(x)
    y = 2.0 * x + 1.0  # 2 e + 1 = y + 2 Z on the low clip, y + 2 Z - 2 (L-1) on the high clip
    lo = tl.zeros_like(s)
    for j in tl.static_range(BITS):  # [lo, lo + 2n - 1], n = L >> (j + 1): mid = floor of the midpoint
        mid = lo + ((L >> (j + 1)) - 1.0)
        t = y + 2.0 * mid
        d = _rsum(h * tl.where(k < -mid, t, tl.where(k >= (L - 1.0) - mid, t - 2.0 * (L - 1.0), 0.0)))
        lo = tl.where(d >= 0.0, lo, mid + 1.0)  # f(mid + 1) - f(mid) >= 0: the minimum is at or below mid
    r = x - k
    kz = k + lo
    e = (r + tl.minimum(kz, 0.0)) + tl.maximum(kz - (L - 1.0), 0.0)
    return lo, _rsum(h * e * e)


@_device_fn
def _pair(ws_ptr, hs_ptr, base, G, k: tl.constexpr, rmask):
    """(c, d) of the k-th pair: c = h h'/(h + h'), d = w[G-1-k] - w[k]; (0, 0) where the group has no such pair."""
    ok = rmask & (base + k < base + G // 2)  # (a tensor comparison: the interpreter needs a tensor mask)
    wl = tl.load(ws_ptr + base + k, mask=ok, other=0.0)
    wh = tl.load(ws_ptr + base + (G - 1 - k), mask=ok, other=0.0)
    hl = tl.load(hs_ptr + base + k, mask=ok, other=0.0)
    hh = tl.load(hs_ptr + base + (G - 1 - k), mask=ok, other=0.0)
    hsum = hl + hh
    return tl.where(hsum > 0.0, hl * hh / tl.where(hsum > 0.0, hsum, 1.0), 0.0), wh - wl


@triton.jit
def _int_kernel(ws_ptr, hs_ptr, s0_ptr, fr_ptr, s_out, z_out, N, G, C, NF,
                L: tl.constexpr, BITS: tl.constexpr, R: tl.constexpr, B: tl.constexpr, PRUNE: tl.constexpr):
    """R groups per program: Min-Max point, coarse scales (table reversed), fine scales; integer Z each."""
    rows, lane, rmask, m, offs = _tile(N, G, R, B)
    w = tl.load(ws_ptr + offs, mask=m, other=0.0)
    h = tl.load(hs_ptr + offs, mask=m, other=0.0)
    s0 = tl.load(s0_ptr + rows, mask=rmask, other=1.0)
    wmin = tl.load(ws_ptr + rows.to(tl.int64) * G, mask=rmask, other=0.0)  # sorted: the first weight
    # the Min-Max point: Z = rint(-min/s0), possibly outside 0..L-1
    z0 = _rint(tl.div_rn(-wmin, s0))
    u = tl.div_rn(w, s0) + z0
    e = u - tl.minimum(tl.maximum(_rint(u), 0.0), L - 1.0)
    mm = s0 * s0 * _rsum(h * e * e)
    if PRUNE:  # the pair lower bound (module docstring) on the 4 outermost pairs
        base = rows.to(tl.int64) * G
        c0, d0 = _pair(ws_ptr, hs_ptr, base, G, 0, rmask)
        c1, d1 = _pair(ws_ptr, hs_ptr, base, G, 1, rmask)
        c2, d2 = _pair(ws_ptr, hs_ptr, base, G, 2, rmask)
        c3, d3 = _pair(ws_ptr, hs_ptr, base, G, 3, rmask)
    # coarse: the table holds the caller's coarse fractions reversed; `<=` keeps the earliest of ties
    best_c = tl.full([R, 1], float("inf"), tl.float32)
    cs = s0
    cz = z0
    i = 0
    while i < C:
        s = s0 * tl.load(fr_ptr + i)
        need = rmask
        if PRUNE:
            a = (L - 1.0) * s
            g0 = tl.maximum(d0 - a, 0.0)
            g1 = tl.maximum(d1 - a, 0.0)
            g2 = tl.maximum(d2 - a, 0.0)
            g3 = tl.maximum(d3 - a, 0.0)
            bound = (c0 * g0 * g0 + c1 * g1 * g1) + (c2 * g2 * g2 + c3 * g3 * g3)
            need = need & (bound <= tl.minimum(best_c, mm) * _SLACK)
        go = tl.max(need.to(tl.int32)) > 0  # uniform: without PRUNE always true
        if go:
            z, f = _int_loss(w, h, s, L, BITS)
            loss = s * s * f
            better = loss <= best_c
            best_c = tl.where(better, loss, best_c)
            cs = tl.where(better, s, cs)
            cz = tl.where(better, z, cz)
        i = tl.where(go, i + 1, C)  # no group needs this scale: no smaller one either (ascending list only)
    take = best_c < mm  # the Min-Max point first: it wins every tie
    best = tl.where(take, best_c, mm)
    best_s = tl.where(take, cs, s0)
    best_z = tl.where(take, cz, z0)
    # fine: s_c + s0 * fr in the caller's order, strict <, s <= 0 invalid
    s_c = best_s
    for j in range(C, C + NF):
        s = s_c + s0 * tl.load(fr_ptr + j)
        ok = s > 0.0
        s = tl.where(ok, s, s0)
        z, f = _int_loss(w, h, s, L, BITS)
        loss = tl.where(ok, s * s * f, float("inf"))
        better = loss < best
        best = tl.where(better, loss, best)
        best_s = tl.where(better, s, best_s)
        best_z = tl.where(better, z, best_z)
    tl.store(s_out + rows, best_s, mask=rmask)
    tl.store(z_out + rows, best_z, mask=rmask)


def search_scales_int(ws, hs, s0, bits: int, coarse_fr, fine_fr, rows_per_program=None, num_warps=None,
                      prune: bool = True):
    """ws (N, G) float32 (sorted ascending per row, as params._prep gives them; G <= 256), hs (N, G) normalised
    importances aligned with ws, s0 (N,) > 0 (Min-Max scale), on CUDA (or under TRITON_INTERPRET=1 on CPU).
    coarse_fr / fine_fr: sequences of Python floats. Returns (s, z) float32 (N,), z absolute (dequant s*(q - z)).
    prune: skip the coarse scales that provably cannot win (used only when coarse_fr is ascending; exact)."""
    N, G = ws.shape
    out_s, out_z = _outputs(ws)
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise UserError(f"bits={bits} is outside 1..8")
    coarse_fr, fine_fr = [float(f) for f in coarse_fr], [float(f) for f in fine_fr]
    if N == 0:
        return out_s, out_z
    dev = ws.device
    table = coarse_fr[::-1] + fine_fr
    fr = torch.tensor(table or [0.0], dtype=torch.float32, device=dev)  # float32, as torch rounds a scalar
    ascending = all(a < b for a, b in zip(coarse_fr, coarse_fr[1:])) and all(f > 0 for f in coarse_fr)
    B = _block(G)
    if num_warps is None:
        num_warps = 1
    if rows_per_program is None:  # GPU: 128 lanes a warp (B >= 128: one group); interpreter: big tiles
        rows_per_program = min(_block(N), max(1, (8192 if INTERPRET else 128 * num_warps) // B))
    R = int(rows_per_program)
    if R < 1 or R & (R - 1):
        raise UserError(f"rows_per_program={R} must be a power of two")
    grid = (triton.cdiv(N, R),)
    _int_kernel[grid](ws.contiguous().to(torch.float32), hs.contiguous().to(torch.float32),
                      s0.contiguous().to(torch.float32), fr, out_s, out_z, N, G, len(coarse_fr), len(fine_fr),
                      L=1 << bits, BITS=bits, R=R, B=B, PRUNE=bool(prune and ascending), num_warps=num_warps,
                      enable_fp_fusion=False)
    return out_s, out_z


__all__ = ["search_scales_int"]
