"""Stage A of NeUQI: the optimal float zero-point for a fixed scale (NEUQI.md, "Stage A").

For one group with `x_j = w_j / s` and importances `h_j >= 0` the objective is

    f(Z) = Σ_j h_j (x_j + Z - clamp(round(x_j + Z), 0, L - 1))² / Σ_j h_j ,   L = 2**bits.

Two steps, both batched over every group at once (sorts, cumulative sums, gathers; no Python loop over
groups), on the device of the input, in float32:

1. Surrogate (rounding error replaced by its bound ¼ inside the clamp range): a convex piecewise
   quadratic with 2G events `Z = -½ - x_j` and `Z = L - ½ - x_j`. Both event lists are sorted as soon
   as the x are sorted (they are `-x` shifted), and x sorted once per group serves every scale, because
   `x = w / s` keeps the order of `w`. The two lists are merged with `searchsorted`; the quadratic of the
   interval after each event comes from prefix sums. Minimising every interval's quadratic in closed form
   and taking the best is, for a convex function, the same as taking the interval where the right
   derivative turns non-negative and minimising there (clamped to it) → Z₁; that is what is computed,
   with one count instead of a comparison of 2G+1 values that cancel badly in float32.
2. Exact sweep on the window `[Z₁ - 1, Z₁ + 1]`: every element crosses at most two rounding breakpoints
   there, one at `d_j ∈ (0, 1]` past the window start and one at `d_j + 1`, so a single sort of the
   `d_j` orders all 2G events. The running sum `A1 = Σ h r` (r = x + Z_start - q, q the clamped code)
   changes only where the clamped code changes; on every interval `f = T0 δ² + 2 A1 δ + A2` (δ = Z - Z_start)
   has its minimum at `δ = -A1/T0`, clamped to the interval. The values are accumulated from f at the
   window start by the exact increment over each interval (not as `A2 - A1²`, which cancels), and the
   best `refine` (default 2) interval minima are re-evaluated element by element before picking one.

Numerics: the work is done in coordinates `u = x + n` with a per-group integer shift `n` that puts the
group near the code range `[0, L - 1]` (or keeps `n` as close to 0 as possible when the group fits), so
the running sums stay O(1) per element and the answer keeps the precision of the input.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError

VALID_BITS = (2, 3, 4, 8)


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise UserError(f"bits={bits!r} is not supported; use one of 2, 3, 4, 8")
    return bits


def _integer_shift(u_min: Tensor, u_max: Tensor, L: int) -> Tensor:
    """Per-group integer n: if the group fits in the code range, the n closest to 0 that keeps all of
    x + n inside [-½, L - ½]; otherwise the n that centres the group on the code range."""
    n_lo = torch.ceil(-0.5 - u_min)
    n_hi = torch.floor((L - 0.5) - u_max)
    fits = n_lo <= n_hi
    centred = torch.round((L - 1) / 2 - (u_min + u_max) / 2)
    near0 = torch.minimum(torch.maximum(torch.zeros_like(n_lo), n_lo), n_hi)
    return torch.where(fits, near0, centred)


def _surrogate_argmin(u: Tensor, h: Tensor, L: int) -> Tensor:
    """Minimiser Z₁ of the surrogate (in the coordinates of u, i.e. of g(Z) with u + Z) for every row.
    u: (N, G) ascending; h: (N, G) >= 0 aligned with u, Σ h > 0.

    g is convex, so its right derivative after each event is non-decreasing along the merged event order;
    the minimiser lies in the interval right after the last event with a negative right derivative.
    On an interval with n1 elements out of the low-clip region and n2 in the high-clip region,
    g'(Z)/2 = a Z + b with a = Σ_clipped h, b = Σ_low h u + Σ_high h (u - (L-1)), from prefix sums."""
    N, G = u.shape
    dev, dt = u.device, u.dtype
    ud = u.flip(-1)  # descending u: events ascending
    hd = h.flip(-1)
    E1 = -0.5 - ud  # E1[i]: the i-th largest u leaves the low-clip region (ascending in i)
    E2 = (L - 0.5) - ud  # E2[j]: the j-th largest u enters the high-clip region
    z0 = torch.zeros(N, 1, device=dev, dtype=dt)
    # high-clip region = the first n2 of the descending order, in coordinates u - (L - 1)
    P0 = torch.cat([z0, hd.cumsum(-1)], -1)
    P1 = torch.cat([z0, (hd * (ud - (L - 1))).cumsum(-1)], -1)
    # low-clip region = the first m = G - n1 of the ascending order
    S0 = torch.cat([z0, h.cumsum(-1)], -1)
    S1 = torch.cat([z0, (h * u).cumsum(-1)], -1)
    # merge: state right after each event (ties: E2 before E1)
    n2_at_e1 = torch.searchsorted(E2, E1, right=True)  # after E1[i]: n1 = i + 1
    n1_at_e2 = torch.searchsorted(E1, E2, right=False)  # after E2[j]: n2 = j + 1
    a1 = S0[:, :-1].flip(-1) + P0.gather(1, n2_at_e1)  # S0[G - 1 - i]
    b1 = S1[:, :-1].flip(-1) + P1.gather(1, n2_at_e1)
    m2 = G - n1_at_e2
    a2 = S0.gather(1, m2) + P0[:, 1:]
    b2 = S1.gather(1, m2) + P1[:, 1:]
    c1 = ((a1 * E1 + b1) < 0).sum(-1, keepdim=True)  # events with a negative right derivative
    c2 = ((a2 * E2 + b2) < 0).sum(-1, keepdim=True)
    ninf = torch.full((N, 1), float("-inf"), device=dev, dtype=dt)
    inf = -ninf
    i1 = (c1 - 1).clamp(min=0)
    i2 = (c2 - 1).clamp(min=0)
    e1 = torch.where(c1 > 0, E1.gather(1, i1), ninf)
    e2 = torch.where(c2 > 0, E2.gather(1, i2), ninf)
    from_e1 = (c1 > 0) & (e1 >= e2)
    from_e2 = (c2 > 0) & ~from_e1
    n1 = torch.where(from_e1, c1, torch.where(from_e2, n1_at_e2.gather(1, i2), torch.zeros_like(c1)))
    n2 = torch.where(from_e1, n2_at_e1.gather(1, i1), torch.where(from_e2, c2, torch.zeros_like(c2)))
    lo = torch.maximum(e1, e2)
    E1x = torch.cat([E1, inf], -1)
    E2x = torch.cat([E2, inf], -1)
    hi = torch.minimum(E1x.gather(1, c1), E2x.gather(1, c2))
    a = S0.gather(1, G - n1) + P0.gather(1, n2)
    b = S1.gather(1, G - n1) + P1.gather(1, n2)
    pos = a > 0
    z = torch.where(pos, -b / torch.where(pos, a, torch.ones_like(a)), lo)
    return torch.minimum(torch.maximum(z, lo), hi)


def _exact_window(x: Tensor, n: Tensor, u: Tensor, h: Tensor, T0: Tensor, z1: Tensor, L: int,
                  refine: int = 2) -> tuple[Tensor, Tensor]:
    """Exact minimum of f on [z1 - 1, z1 + 1] in coordinates u = x + n (n: per-row integer shift).
    Returns (z*, f(z*)) each (N, 1), z* relative to n, f normalised by T0."""
    lo = z1 - 1.0
    v = u + lo
    k1 = torch.floor(v + 0.5)  # code (unclamped) just after the window start
    q0 = k1.clamp(0, L - 1)
    r0 = v - q0
    hr0 = h * r0
    A1_0 = hr0.sum(-1, keepdim=True)
    f_0 = (hr0 * r0).sum(-1, keepdim=True)  # f at the window start (times T0)
    d1 = ((k1 + 0.5) - v).clamp(0.0, 1.0)  # first crossing, in (0, 1] past the start
    valid1 = (k1 >= 0) & (k1 <= L - 2)  # clamped code goes k1 -> k1 + 1
    valid2 = (k1 >= -1) & (k1 <= L - 3)  # clamped code goes k1 + 1 -> k1 + 2
    zero = torch.zeros_like(h)
    dA1_1 = torch.where(valid1, -h, zero)
    dA1_2 = torch.where(valid2, -h, zero)
    d1s, perm = torch.sort(d1, dim=-1, stable=True)
    ev = torch.cat([d1s, d1s + 1.0], -1)  # all 2G events, sorted (the second crossings are d1 + 1)
    dA1 = torch.cat([dA1_1.gather(1, perm), dA1_2.gather(1, perm)], -1)
    A1 = torch.cat([A1_0, dA1], -1).cumsum(-1)  # A1 on interval k (k = 0..2G)
    # f at every event from the exact increments over each interval (f is continuous): rounding stays
    # relative to the values of f met on the way instead of to Σ h r².
    N = u.shape[0]
    zcol = torch.zeros(N, 1, device=u.device, dtype=u.dtype)
    los = torch.cat([zcol, ev], -1)
    his = torch.cat([ev, zcol + 2.0], -1)
    inc = (his[:, :-1] - los[:, :-1]) * (T0 * (his[:, :-1] + los[:, :-1]) + 2.0 * A1[:, :-1])
    f_lo = torch.cat([f_0, inc], -1).cumsum(-1)
    d = torch.minimum(torch.maximum(-A1 / T0, los), his)
    val = f_lo + (d - los) * (T0 * (d + los) + 2.0 * A1)
    # Near-ties between intervals are decided by f values carrying float32 rounding of u = x + n (up to
    # ~1e-5 at 8 bits): re-evaluate the `refine` best interval minima element by element as
    # e = (x + (n - q)) + z, where n - q is an exact integer and x + (n - q) is small, so e keeps the
    # precision of x; keep the best of those.
    K = min(int(refine), val.shape[1])
    if K <= 1:
        k = val.argmin(-1, keepdim=True)
        return lo + d.gather(1, k), (val.gather(1, k) / T0).clamp_min(0.0)
    ks = val.topk(K, dim=-1, largest=False, sorted=True).indices
    zk = (lo + d.gather(1, ks)).unsqueeze(2)  # (N, K, 1) candidate zero-points relative to n
    q = torch.round(u.unsqueeze(1) + zk).clamp(0, L - 1)  # (N, K, G)
    e = (x.unsqueeze(1) + (n.unsqueeze(1) - q)) + zk
    fk = (h.unsqueeze(1) * e * e).sum(-1) / T0
    j = fk.argmin(-1, keepdim=True)
    return zk.squeeze(2).gather(1, j), fk.gather(1, j)


def stage_a_sorted(x_sorted: Tensor, h: Tensor, bits: int, refine: int = 2) -> tuple[Tensor, Tensor]:
    """Core of Stage A on pre-sorted groups. x_sorted: (N, G) ascending per row; h: (N, G) >= 0 aligned
    with it, each row with Σ h > 0 (rows are not renormalised). Returns (Z, f) each (N,) float32:
    the optimal zero-point for these x and the normalised objective f(Z) (float32 estimate)."""
    L = 1 << bits
    x = x_sorted.to(torch.float32)
    h = h.to(torch.float32)
    n = _integer_shift(x[:, :1], x[:, -1:], L)
    u = x + n
    T0 = h.sum(-1, keepdim=True)
    z1 = _surrogate_argmin(u, h, L)
    z, f = _exact_window(x, n, u, h, T0, z1, L, refine)
    return (n + z).squeeze(-1), f.squeeze(-1)


def _normalised_h(h: Tensor) -> Tensor:
    """Rows with Σ h = 0 fall back to uniform h."""
    s = h.sum(-1, keepdim=True)
    return torch.where(s > 0, h, torch.ones_like(h))


def objective(x: Tensor, h: Tensor, zero: Tensor, bits: int) -> Tensor:
    """f(Z) = Σ h (x + Z - clamp(round(x + Z), 0, L-1))² / Σ h in float64 (h rows summing to 0 -> uniform)."""
    L = 1 << bits
    xd = x.to(torch.float64)
    hd = _normalised_h(h.to(torch.float64))
    u = xd + zero.to(torch.float64).unsqueeze(-1)
    e = u - torch.clamp(torch.round(u), 0, L - 1)
    return (hd * e * e).sum(-1) / hd.sum(-1)


def optimal_zero_point(x: Tensor, h: Tensor, bits: int, chunk_elems: int | None = None) -> tuple[Tensor, Tensor]:
    """Stage A: x, h of shape (..., G) (x = w/s). Returns (zero, err) of shape (...):
    the float zero-point Z* minimising f(Z) = Σ h (x + Z - clamp(round(x+Z),0,L-1))² / Σ h, and f(Z*).

    `zero` is float32; `err` is f evaluated at that float32 zero in float64 (returned as float32).
    A group whose h sums to 0 is treated as uniform. Groups are processed chunk_elems elements at a time
    (default 2**16 on CPU, 2**22 on GPU)."""
    bits = _check_bits(bits)
    if x.shape != h.shape:
        raise UserError(f"x has shape {tuple(x.shape)} but h has {tuple(h.shape)}; pass h with the same shape as x")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise UserError("x must have a non-empty last (group) dimension")
    if not torch.isfinite(x).all():
        raise UserError("x contains NaN/Inf; repair the weights or the scale before computing the zero-point")
    if not torch.isfinite(h).all() or (h < 0).any():
        raise UserError("h must be finite and non-negative; pass diag(H) (or ones)")
    lead = x.shape[:-1]
    G = x.shape[-1]
    xf = x.reshape(-1, G).to(torch.float32)
    hf = _normalised_h(h.reshape(-1, G).to(torch.float32))
    N = xf.shape[0]
    zero = torch.empty(N, dtype=torch.float32, device=x.device)
    err = torch.empty(N, dtype=torch.float32, device=x.device)
    chunk_elems = chunk_elems or (1 << 22 if x.device.type == "cuda" else 1 << 16)
    rows = max(1, int(chunk_elems) // G)
    for i in range(0, N, rows):
        xs, perm = torch.sort(xf[i:i + rows], dim=-1, stable=True)
        hs = hf[i:i + rows].gather(1, perm)
        z, _ = stage_a_sorted(xs, hs, bits)
        zero[i:i + rows] = z
        err[i:i + rows] = objective(xs, hs, z, bits).to(torch.float32)
    return zero.reshape(lead), err.reshape(lead)
