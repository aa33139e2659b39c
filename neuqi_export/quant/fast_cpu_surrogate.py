"""The surrogate's walk of the numba Stage A (fast_cpu.py), and the lower bound of f it gives.

Written here because no library solves this piecewise-quadratic problem: NEUQI.md's Stage A step 1. For x
sorted once per group, the low-clip set {x_j + Z < −½} is a prefix of x and the high-clip set
{x_j + Z > L − ½} a suffix, so with prefix sums of h and h·(w − min) (scale-free: computed once per group)
the surrogate's derivative on any interval between events costs O(1), and the walk may start anywhere below
Z₁ (the previous scale's Z₁, moved with the scale) instead of at −∞.
"""
from __future__ import annotations

import numpy as np

try:  # optional dependency (fast_cpu.py imports this module only when numba is there)
    from numba import njit
    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised when numba is absent
    HAVE_NUMBA = False

if HAVE_NUMBA:

    @njit(cache=True, nogil=True)
    def _count_below(x, t):
        """Number of entries of the ascending x that are < t (the first index with x[i] >= t). A plain bisection
        rather than np.searchsorted: measured faster inside these kernels (fast_cpu_int.py)."""
        lo = 0
        hi = x.shape[0]
        while lo < hi:
            m = (lo + hi) >> 1
            if x[m] < t:
                lo = m + 1
            else:
                hi = m
        return lo

    @njit(cache=True, nogil=True)
    def _prefix_sums(xr, h, Ph, Phx):
        """Ph[k] = Σ_{j<k} h_j, Phx[k] = Σ_{j<k} h_j·xr_j (k = 0..G) into the given (G + 1,) arrays; returns Σ h."""
        Ph[0] = 0.0
        Phx[0] = 0.0
        for j in range(xr.shape[0]):
            Ph[j + 1] = Ph[j] + h[j]
            Phx[j + 1] = Phx[j] + h[j] * xr[j]
        return Ph[xr.shape[0]]

    @njit(cache=True, nogil=True)
    def _slope(Ph, Phx, i1, i2, inv_s, Lm1):
        """(a, b): the surrogate's derivative a·Z + b (halved) while x[..i1] is clipped low and x[i2+1..] high."""
        G = Ph.shape[0] - 1
        nh = Ph[G] - Ph[i2 + 1]
        return Ph[i1 + 1] + nh, (Phx[i1 + 1] + (Phx[G] - Phx[i2 + 1])) * inv_s - Lm1 * nh

    @njit(cache=True, nogil=True)
    def _surrogate(x, Ph, Phx, inv_s, L, zg):
        """(Z₁, i1, i2): the minimiser Z₁ of NeUQI's surrogate Σ h ψ(x + Z) for x (G,) ascending, and the clipped
        elements there (x[..i1] below, x[i2+1..] above), with ψ(u) = u² below −½, ¼ on [−½, L − ½],
        (u − L + 1)² above. Ph, Phx: prefix sums of h and of h·x·s (x·s = w − min does not depend on the
        scale, so they are computed once per group; inv_s = 1/s). Between consecutive events −½ − x_j and
        L − ½ − x_j the derivative is a·Z + b, non-decreasing; the low set is a prefix of x and the high set a
        suffix, so (a, b) come from the prefix sums in O(1) for any position of the walk. The walk over the
        events in ascending order stops at the first one where the derivative is >= 0 and minimises there
        (clamped to the interval; a flat interval gives its left end). It starts at zg (a warm start: the
        previous scale's Z₁, shifted) when the right derivative there is < 0, else at zg − 2, else at −∞;
        the result is a function of the interval where it stops (its (a, b) and ends are summed from the
        same indices), so it does not depend on the start."""
        G = x.shape[0]
        Lm1 = L - 1.0
        i1 = G - 1  # low = x[0..i1], high = x[i2+1..]: elements i1+1.. have left the low clip
        i2 = G - 1
        for attempt in range(2):
            z = zg - 2.0 * attempt
            if not z > -np.inf:
                break
            k1 = _count_below(x, -0.5 - z) - 1
            k2 = _count_below(x, (L - 0.5) - z) - 1
            a, b = _slope(Ph, Phx, k1, k2, inv_s, Lm1)
            if a * z + b < 0.0:
                i1 = k1
                i2 = k2
                break
        while True:
            a, b = _slope(Ph, Phx, i1, i2, inv_s, Lm1)
            e2 = (L - 0.5) - x[i2] if i2 >= 0 else np.inf
            e1 = -0.5 - x[i1] if i1 >= 0 else np.inf
            is2 = e2 <= e1  # ties: the high-clip event first
            e = e2 if is2 else e1
            if e == np.inf or a * e + b >= 0.0:
                # the interval's left end: the last event passed
                prev = -0.5 - x[i1 + 1] if i1 + 1 < G else -np.inf
                if i2 + 1 < G:
                    prev = max(prev, (L - 0.5) - x[i2 + 1])
                if a > 0.0:
                    return min(max(-b / a, prev), e), i1, i2
                return prev, i1, i2
            if is2:
                i2 -= 1
            else:
                i1 -= 1

    @njit(cache=True, nogil=True)
    def _lower_bound(x, h, L, Ph, Phx, inv_s, zg):
        """(a lower bound of min over Z of f = Σ h e², the surrogate's minimiser Z₁): the surrogate less its ¼
        per element, Σ h (u² − ¼) over the clipped elements at Z₁. Below f everywhere: a clipped element's
        error is u itself (code 0, |u| > ½; or u − L + 1 at the top), so e² >= u² − ¼, and an unclipped one
        adds e² >= 0. (Tighter than the clipping distance (|u| − ½)² used before: u² − ¼ − (|u| − ½)² =
        |u| − ½ >= 0; it prunes more: 3-9% faster searches, same results.)"""
        z1, i1, i2 = _surrogate(x, Ph, Phx, inv_s, L, zg)
        f = 0.0  # only the clipped elements contribute: the prefix x[..i1] below, the suffix x[i2+1..] above
        for j in range(i1 + 1):
            u = x[j] + z1
            f += h[j] * (u * u - 0.25)
        for j in range(i2 + 1, x.shape[0]):
            u = x[j] + (z1 - (L - 1.0))
            f += h[j] * (u * u - 0.25)
        return f, z1
