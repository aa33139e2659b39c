"""Optional Triton fast path for NeUQI's Stage A + Stage B on CUDA (NEUQI.md, "Stage A" / "Stage B").

One kernel runs the whole per-group scale search (coarse C + fine 2F candidates, 96 Stage-A solves by
default). A program owns a tile of R groups x B lanes (B = the group size rounded up to a power of two, so
g32/g64/g128/g256 and the shorter last group all fit; padded lanes repeat the group's maximum with h = 0, so
they neither reorder the group nor change any sum), loads its groups once, keeps them in registers for every
candidate scale and writes back only (s, Z). Default R = num_warps = 4 (two groups per warp below B = 64):
Triton then gives each warp whole rows, so the per-scale sorts, scans and reductions run on warp shuffles
(ptxas for sm_90, B = 128: 3,872 SASS instructions per warp in all, most of them the scale loop's body, which
runs once per group and candidate; 168 registers, no spills).
Same contract, grids and tie rules as `fast_cpu.search_scales`: the groups arrive sorted (the one sort per
group is `params._prep`'s `torch.sort`), and x = (w - min)/s keeps that order for every scale. Per scale:

- x = (w - min)/s with IEEE division (`div_rn`: the torch path's bits), then the torch path's per-group
  integer shift n, u = x + n (keeps the running sums O(1) per element).
- Surrogate: both event lists `-½ - u` and `L - ½ - u` are already sorted (u is); laid out as one bitonic
  row of 2B int64 keys (order-preserving float bits, then the list, E2 first on ties as in the torch path,
  then the lane) they are merged by the last stage of a bitonic sort alone (Triton's own network: log2(2B) =
  8 compare-exchange rounds at g128 instead of a full `tl.sort`'s 36; static SASS 4,664 -> 3,976 per warp,
  5,152 from 7,800 with one group per program); the coefficients (a, b) of the derivative after every
  event are prefix sums of the gathered h and u, and Z₁ lies between the last event with a negative
  derivative and the next one (the surrogate is convex); the quadratic there is re-summed exactly and
  minimised in closed form (clamped to the interval).
- Exact window `[Z₁ - 1, Z₁ + 1]`: every element crosses a rounding breakpoint at an offset d ∈ [0, 1] and
  again at d + 1. One `tl.sort` of B int64 keys packs the float bits of d with the payload (the element's h
  and whether each crossing changes the clamped code), so h travels with its event without a gather; the
  event list is the sorted d followed by the same d + 1. Prefix sums give A1 on every interval, f at every
  interval end comes from the exact increments over the intervals (as the torch path), and every interval's
  minimum is taken in closed form. The best interval minimum on [0, 1] and on [1, 2] (f's near-ties: without
  clipping f has period 1) are re-evaluated element by element like the torch path's `refine=2`; the lower
  one wins.
- Stage B: coarse s = fl32(s₀·fl32(i/C)) for i = C..1 with `<=` (the torch path's ascending strict `<`: the
  smallest i wins a tie), then s_c + fl32(s₀·fl32(j/D)) (j = -F..F, j != 0, s > 0) with `<`. The fractions
  come from the host in float32 and the kernel is compiled without FMA contraction, so every candidate scale
  has the torch path's bits. Pruning (exact): the k-th smallest and k-th largest weight of a group end at
  least xr[G-1-k] - xr[k] - (L-1)s apart after quantization, so Σ_k h h'/(h + h') · gap² (disjoint pairs,
  O(B) per scale, no sort) bounds the loss from below; a coarse scale whose bound exceeds the best loss found
  (scanning down from the Min-Max scale) cannot win and is skipped when it can be skipped for every group of
  the program (a uniform branch). On heavy-tailed weights this skips ~13% / 26% / 38% of the 96 solves at
  2 / 3 / 4 bits (one group per program; fewer with R groups deciding together).

float32 throughout (so is the torch path); the loss of every group equals the torch path's within float32
rounding (tested under Triton's CPU interpreter, TRITON_INTERPRET=1, which must be set before this module is
imported; the interpreter runs the helpers as plain Python and `tl.sort` as numpy's sort, the same
semantics at a fraction of its per-op cost). Groups longer than MAX_GROUP (long per-channel rows) are left
to the torch path by `params`.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
import triton
import triton.language as tl

from ..errors import UserError


@triton.jit
def _probe():
    """Empty: tells whether triton.jit interprets (TRITON_INTERPRET=1 when this module was imported)."""


INTERPRET = type(_probe).__name__ == "InterpretedFunction"  # triton.jit read TRITON_INTERPRET at decoration
MAX_GROUP = 256  # B = 512 spills registers to local memory on sm_90 (ptxas), so longer rows take the torch path


try:  # Triton's own bitonic merge network (the last stage of tl.sort, a private helper: checked by signature);
    # other triton versions without it (or with another signature) get the full tl.sort, same result
    from triton.language.standard import _bitonic_merge_hypercube
    if list(inspect.signature(_bitonic_merge_hypercube.fn).parameters) != ["x", "stage", "order"]:
        _bitonic_merge_hypercube = None  # pragma: no cover - depends on the installed triton
except (ImportError, AttributeError, TypeError, ValueError):  # pragma: no cover - depends on the installed triton
    _bitonic_merge_hypercube = None
HAVE_MERGE = _bitonic_merge_hypercube is not None

if INTERPRET:
    def _sort_rows(key):
        """Interpreter only: numpy's sort of the tile (tl.sort's bitonic network runs element by element there)."""
        h = key.handle
        return tl.core.tensor(type(h)(np.sort(h.data, axis=-1), h.dtype), key.type)

    def _merge_rows(key, NDIM, STAGE):
        """Interpreter only: the sorted rows (what the merge network gives for bitonic rows)."""
        return _sort_rows(key)
else:
    @triton.jit
    def _sort_rows(key):
        """Ascending sort of every row of the tile (bitonic, in registers)."""
        return tl.sort(key, dim=1)

    if HAVE_MERGE:
        @triton.jit
        def _merge_rows(key, NDIM: tl.constexpr, STAGE: tl.constexpr):
            """Ascending order of every row of the tile whose rows are bitonic (ascending, then descending): only
            the last stage of the bitonic sort, log2(row) compare-exchange rounds instead of tl.sort's
            log2(row)·(log2(row) + 1)/2. NDIM = log2(tile size), STAGE = log2(row length)."""
            h = tl.reshape(key, [2] * NDIM)
            h = _bitonic_merge_hypercube(h, STAGE, 0)
            return tl.reshape(h, key.shape)
    else:  # pragma: no cover
        @triton.jit
        def _merge_rows(key, NDIM: tl.constexpr, STAGE: tl.constexpr):
            return tl.sort(key, dim=1)


def _device_fn(fn):
    """@triton.jit for the kernel's helpers; under the interpreter plain Python (the same body: the interpreter
    re-patches triton.language on every call of a nested jit function, which would dominate its run time)."""
    return fn if INTERPRET else triton.jit(fn)


@_device_fn
def _pick(t, idx):
    """t[r, idx[r]] for every row r: idx and the result are (R, 1) columns."""
    return tl.gather(t, idx, axis=1)


@_device_fn
def _rsum(t):
    """Row sums as an (R, 1) column."""
    return tl.sum(t, axis=1, keep_dims=True)


@_device_fn
def _event_keys(E, lane):
    """int64 sort keys of events E: order-preserving float bits << 31 | lane (bit 30 is left for a tag)."""
    ib = E.to(tl.int32, bitcast=True).to(tl.int64)
    sortable = tl.where(ib >= 0, ib + 0x80000000, -1 - ib)  # in [0, 2**32), ascending with E
    return (sortable << 31) | lane.to(tl.int64)


if INTERPRET:
    def _rint(v):
        """Round half to even (torch.round) for |v| < 2**22 (interpreter: the same rounding from floor)."""
        r = tl.floor(v)
        fr = v - r
        odd = (r - 2.0 * tl.floor(0.5 * r)) != 0.0
        up = (fr > 0.5) | ((fr == 0.5) & odd)
        return r + up.to(tl.float32)
else:
    from triton.language.extra import libdevice as _libdevice

    @triton.jit
    def _rint(v):
        """Round half to even (torch.round): one instruction (cvt.rni)."""
        return _libdevice.rint(v)


@_device_fn
def _f_at(x, n, u, h, zk, L: tl.constexpr):
    """Σ h e² at the zero-point zk (R, 1) in u-coordinates, e = (x + (n - q)) + zk as the torch path's refine."""
    q = tl.minimum(tl.maximum(_rint(u + zk), 0.0), L - 1.0)
    e = (x + (n - q)) + zk
    return _rsum(h * e * e)


@_device_fn
def _surrogate_keys(u, L: tl.constexpr, B: tl.constexpr):
    """The surrogate's 2B events of every row as int64 keys, each row BITONIC: the first half holds E1 = -½ - u in
    ascending order (lanes B-1..0), the second half E2 = L - ½ - u in descending order (lanes 0..B-1); key =
    order-preserving float bits << 31 | (E1: 1, E2: 0) << 30 | t, where t = B-1-lane rises along the first half
    and falls along the second, so ties keep both halves monotone (and E2 sorts before E1 on a tie, as in the
    torch path). The lane is B - 1 - (key & (2**30 - 1)). Built by a gather: tl.join + tl.reshape inside the
    scale loop broke Triton 3.9's layout pass."""
    p = tl.arange(0, 2 * B)[None, :]
    first = p < B
    j0 = tl.broadcast_to(tl.where(first, (B - 1) - p, p - B), (u.shape[0], 2 * B))
    u0 = _pick(u, j0)
    E0 = tl.where(first, -0.5 - u0, (L - 0.5) - u0)
    return _event_keys(E0, (B - 1) - j0) | (first.to(tl.int64) << 30)


@_device_fn
def _surrogate(u, h, T0, lane, L: tl.constexpr, B: tl.constexpr, NDIM: tl.constexpr, STAGE: tl.constexpr):
    """Minimiser Z₁ (R, 1) of the surrogate for u (R, B) ascending, h aligned, T0 = Σ h (zeropoint.py)."""
    # the two event lists merged by one bitonic merge of 2B keys (see _surrogate_keys); (a, b) after every event
    # from prefix sums. (Which of several tied events comes first changes no result: every event raises the
    # convex surrogate's derivative, and lo / hi below are event values, not positions.)
    E1 = -0.5 - u
    E2 = (L - 0.5) - u
    key = _merge_rows(_surrogate_keys(u, L, B), NDIM, STAGE)
    j = (B - 1) - (key & 0x3FFFFFFF).to(tl.int32)
    is1 = ((key >> 30) & 1) != 0
    sb = key >> 31
    E = tl.where(sb >= 0x80000000, sb - 0x80000000, -1 - sb).to(tl.int32).to(tl.float32, bitcast=True)
    hj = _pick(h, j)
    uj = _pick(u, j)
    a = T0 + tl.cumsum(tl.where(is1, -hj, hj), axis=1)  # leaving the low clip / entering the high clip
    b = _rsum(h * u) + tl.cumsum(tl.where(is1, -hj * uj, hj * (uj - (L - 1.0))), axis=1)
    neg = a * E + b < 0.0  # right derivative after the event (non-decreasing: g is convex)
    lo = tl.max(tl.where(neg, E, -float("inf")), axis=1, keep_dims=True)
    hi = tl.min(tl.where(neg, float("inf"), E), axis=1, keep_dims=True)
    # the quadratic on (lo, hi), its membership evaluated directly (exact sums, no cancellation of prefix sums)
    low = E1 > lo
    high = E2 <= lo
    a = _rsum(tl.where(low | high, h, 0.0))
    b = _rsum(tl.where(low, h * u, tl.where(high, h * (u - (L - 1.0)), 0.0)))
    z1 = tl.where(a > 0.0, -b / tl.where(a > 0.0, a, 1.0), lo)
    return tl.minimum(tl.maximum(z1, lo), hi)


@_device_fn
def _window(x, n, u, h, T0, invT0, lane, z1, L: tl.constexpr, B: tl.constexpr):
    """Exact minimum of f on [z1 - 1, z1 + 1] (u = x + n): (Z relative to n, Σ h e² / T0) as (R, 1) columns."""
    # δ = Z - (z1 - 1) ∈ [0, 2]
    lo_w = z1 - 1.0
    v = u + lo_w
    k1 = tl.floor(v + 0.5)
    r0 = v - tl.minimum(tl.maximum(k1, 0.0), L - 1.0)
    hr0 = h * r0
    A10 = _rsum(hr0)
    f0 = _rsum(hr0 * r0)
    d1 = tl.minimum(tl.maximum((k1 + 0.5) - v, 0.0), 1.0)
    ok1 = ((k1 >= 0.0) & (k1 <= L - 2.0)).to(tl.int64)  # the first crossing changes the clamped code
    ok2 = ((k1 >= -1.0) & (k1 <= L - 3.0)).to(tl.int64)  # the second one (at d + 1) too
    dbits = (d1.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)  # d ∈ [0, 1]: < 2**30
    hbits = (h.to(tl.int32, bitcast=True) & 0x7FFFFFFF).to(tl.int64)
    key = _sort_rows((dbits << 33) | (ok2 << 32) | (ok1 << 31) | hbits)
    ds = (key >> 33).to(tl.int32).to(tl.float32, bitcast=True)
    hk = (key & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    P1 = tl.cumsum(tl.where(((key >> 31) & 1) != 0, hk, 0.0), axis=1)
    A1a = A10 - P1  # A1 after the i-th first crossing
    A1b = (A10 - tl.max(P1, axis=1, keep_dims=True)) - tl.cumsum(tl.where(((key >> 32) & 1) != 0, hk, 0.0), axis=1)
    dmin = tl.min(ds, axis=1, keep_dims=True)
    last = lane == B - 1
    nxt = _pick(ds, tl.broadcast_to(tl.minimum(lane + 1, B - 1), ds.shape))
    hiA = tl.where(last, dmin + 1.0, nxt)
    loB = ds + 1.0
    hiB = tl.where(last, 2.0, nxt + 1.0)
    fh0 = f0 + dmin * (T0 * dmin + 2.0 * A10)  # f at the first event
    FA = fh0 + tl.cumsum((hiA - ds) * (T0 * (hiA + ds) + 2.0 * A1a), axis=1)  # f at every interval end
    FB = _rsum(tl.where(last, FA, 0.0)) + tl.cumsum((hiB - loB) * (T0 * (hiB + loB) + 2.0 * A1b), axis=1)
    # every interval's minimum in closed form from f at its end: f(d) = f(hi) - (hi - d)(T0 (hi + d) + 2 A1)
    d0 = tl.minimum(tl.maximum(-A10 * invT0, 0.0), dmin)
    val0 = fh0 - (dmin - d0) * (T0 * (dmin + d0) + 2.0 * A10)
    dA = tl.minimum(tl.maximum(-A1a * invT0, ds), hiA)
    valA = FA - (hiA - dA) * (T0 * (hiA + dA) + 2.0 * A1a)
    dB = tl.minimum(tl.maximum(-A1b * invT0, loB), hiB)
    valB = FB - (hiB - dB) * (T0 * (hiB + dB) + 2.0 * A1b)
    iA = tl.argmin(valA, axis=1, keep_dims=True)
    iB = tl.argmin(valB, axis=1, keep_dims=True)
    zA = lo_w + tl.where(val0 <= tl.min(valA, axis=1, keep_dims=True), d0, _pick(dA, iA))  # best on [0, 1]
    zB = lo_w + _pick(dB, iB)  # best on [1, 2]
    fA = _f_at(x, n, u, h, zA, L)
    fB = _f_at(x, n, u, h, zB, L)
    useB = fB < fA
    return tl.where(useB, zB, zA), tl.div_rn(tl.where(useB, fB, fA), T0)


@_device_fn
def _stage_a(x, h, T0, invT0, lane, L: tl.constexpr, B: tl.constexpr, NDIM: tl.constexpr, STAGE: tl.constexpr):
    """x (R, B) ascending, h aligned (padding: h = 0), T0 = Σ h (R, 1). Returns (Z, f) as (R, 1) columns: the
    optimal zero-point and f(Z) = Σ h e² / T0, via the torch path's integer shift, surrogate and exact window."""
    # integer shift n (zeropoint._integer_shift)
    umin = tl.min(x, axis=1, keep_dims=True)
    umax = tl.max(x, axis=1, keep_dims=True)
    n_lo = tl.ceil(-0.5 - umin)
    n_hi = tl.floor((L - 0.5) - umax)
    centred = _rint((L - 1.0) / 2.0 - (umin + umax) / 2.0)
    n = tl.where(n_lo <= n_hi, tl.minimum(tl.maximum(n_lo, 0.0), n_hi), centred)
    u = x + n
    z, f = _window(x, n, u, h, T0, invT0, lane, _surrogate(u, h, T0, lane, L, B, NDIM, STAGE), L, B)
    return n + z, f


@_device_fn
def _tile(N, G, R: tl.constexpr, B: tl.constexpr):
    """This program's R groups x B lanes: rows (R, 1), lane (1, B), row mask, element mask, element offsets."""
    rows = tl.program_id(0) * R + tl.arange(0, R)[:, None]
    lane = tl.arange(0, B)[None, :]
    rmask = rows < N
    return rows, lane, rmask, rmask & (lane < G), rows.to(tl.int64) * G + lane


@triton.jit
def _search_kernel(ws_ptr, hs_ptr, s0_ptr, fr_ptr, s_out, z_out, N, G, C, NF,
                   L: tl.constexpr, R: tl.constexpr, B: tl.constexpr, PRUNE: tl.constexpr,
                   NDIM: tl.constexpr, STAGE: tl.constexpr):
    """R groups per program: the coarse-to-fine scale search of NEUQI.md Stage B, Stage A per candidate.
    NDIM = log2(R * 2B), STAGE = log2(2B): the surrogate's merge network."""
    rows, lane, rmask, m, offs = _tile(N, G, R, B)
    w = tl.load(ws_ptr + offs, mask=m, other=-float("inf"))
    w = tl.where(m, w, tl.where(rmask, tl.max(w, axis=1, keep_dims=True), 0.0))  # padding repeats the max
    h = tl.where(rmask, tl.load(hs_ptr + offs, mask=m, other=0.0), 1.0)  # rows past N: any valid group
    s0 = tl.load(s0_ptr + rows, mask=rmask, other=1.0)
    wmin = tl.min(w, axis=1, keep_dims=True)
    xr = w - wmin
    T0 = _rsum(h)
    invT0 = 1.0 / T0
    # pair lower bound: the k-th smallest and k-th largest weight end >= xr[G-1-k] - xr[k] - (L-1) s apart
    # after quantization, which costs at least c_k (that gap)², c_k = h h' / (h + h') (pairs are disjoint)
    rev = tl.broadcast_to(tl.maximum(G - 1 - lane, 0), xr.shape)
    dpair = _pick(xr, rev) - xr
    hrev = _pick(h, rev)
    cpair = tl.where((lane < G // 2) & (h + hrev > 0.0), h * hrev / tl.where(h + hrev > 0.0, h + hrev, 1.0), 0.0)
    best = tl.full([R, 1], float("inf"), tl.float32)
    best_s = s0
    best_z = tl.zeros([R, 1], tl.float32)
    s_c = s0
    # coarse s0 * i/C for i = C..1 (the host's table is descending) with <=, i.e. the torch path's ascending
    # strict < (the smallest i wins a tie); then fine s_c + s0 * j/D (j = -F..F without 0, s > 0) with strict <
    for i in range(0, C + NF):
        coarse = i < C
        s_c = tl.where(i == C, best_s, s_c)
        fr = tl.load(fr_ptr + i)
        s = tl.where(coarse, s0 * fr, s_c + s0 * fr)
        need = s > 0.0
        s = tl.where(need, s, s0)
        if PRUNE:  # a coarse scale whose bound is above the best loss found cannot win (cheap: O(B), no sort)
            gap = tl.maximum(dpair - (L - 1.0) * s, 0.0)
            need = need & ((i >= C) | (_rsum(cpair * gap * gap) <= best * (1.0 + 1e-5)))
        if tl.max(need.to(tl.int32)) > 0:  # uniform branch: skipped when no group of the program needs it
            zr, f = _stage_a(tl.div_rn(xr, s), h, T0, invT0, lane, L, B, NDIM, STAGE)
            loss = tl.where(need, s * s * f, float("inf"))
            better = tl.where(coarse, loss <= best, loss < best)
            best = tl.where(better, loss, best)
            best_s = tl.where(better, s, best_s)
            best_z = tl.where(better, zr, best_z)
    tl.store(s_out + rows, best_s, mask=rmask)
    tl.store(z_out + rows, best_z - tl.div_rn(wmin, best_s), mask=rmask)


def _block(G: int) -> int:
    return max(2, 1 << (G - 1).bit_length())


def _outputs(ws):
    """Empty (s, z) float32 outputs for the groups of ws, after checking that the kernels can take them (groups of
    at most MAX_GROUP weights, a CUDA tensor or Triton's CPU interpreter): one-line UserError otherwise."""
    N, G = ws.shape
    if G > MAX_GROUP:
        raise UserError(f"the Triton path handles groups of at most {MAX_GROUP} weights (got {G}); "
                        "use impl='reference'")
    if ws.device.type != "cuda" and not INTERPRET:
        raise UserError("impl='triton' needs a CUDA tensor (or Triton's CPU interpreter: set TRITON_INTERPRET=1 "
                        "before the first import of neuqi_export.quant.fast_triton)")
    return (torch.empty(N, dtype=torch.float32, device=ws.device),
            torch.empty(N, dtype=torch.float32, device=ws.device))


def search_scales(ws, hs, s0, bits: int, coarse: int, fine: int, fine_div: int, prune: bool = True,
                  rows_per_program: int | None = None, num_warps: int | None = None):
    """ws (N, G) float32 sorted ascending per row, hs (N, G) normalised importances aligned with ws, s0 (N,) > 0,
    on a CUDA device (or any device under TRITON_INTERPRET=1). Returns (s, z) float32 (N,), z absolute (for w)."""
    N, G = ws.shape
    out_s, out_z = _outputs(ws)
    if N == 0:
        return out_s, out_z
    dev = ws.device
    fr = [i / coarse for i in range(coarse, 0, -1)] + [j / fine_div for j in range(-fine, fine + 1) if j != 0]
    fr = torch.tensor(fr, dtype=torch.float32, device=dev)  # rounded to float32 once, as torch rounds a scalar
    B = _block(G)
    if num_warps is None:
        num_warps = 4
    if rows_per_program is None:  # GPU: one group per warp (two for g32 and less); interpreter: big numpy tiles
        rows_per_program = min(_block(N), max(1, 8192 // B)) if INTERPRET else num_warps * (1 if B >= 64 else 2)
    R = int(rows_per_program)
    if R < 1 or R & (R - 1):
        raise UserError(f"rows_per_program={R} must be a power of two")
    grid = (triton.cdiv(N, R),)
    _search_kernel[grid](ws.contiguous().to(torch.float32), hs.contiguous().to(torch.float32),
                         s0.contiguous().to(torch.float32), fr, out_s, out_z, N, G, int(coarse), len(fr) - coarse,
                         L=1 << bits, R=R, B=B, PRUNE=bool(prune), NDIM=(R * 2 * B).bit_length() - 1,
                         STAGE=(2 * B).bit_length() - 1, num_warps=num_warps,
                         enable_fp_fusion=False)
    return out_s, out_z


__all__ = ["INTERPRET", "MAX_GROUP", "search_scales"]
