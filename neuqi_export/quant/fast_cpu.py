"""Optional numba fast path for NeUQI's Stage A + Stage B on CPU (NEUQI.md, "Stage A" / "Stage B").

The torch path (`zeropoint.stage_a_sorted` driven by `params._fit_batch`) issues ~100 small tensor ops per
scale candidate; on a CPU it is dispatch- and memory-bound. Here one compiled loop per (row, group) runs the
whole scale search (coarse + fine, 96 Stage-A solves by default) in float64 registers/L1, split over
torch.get_num_threads() Python threads (the kernels release the GIL). Used only when `numba` is importable
and the weight is on the CPU (`init_params(..., impl="auto")`, the default); otherwise, and with
``impl="reference"``, the torch path runs. Same method, same grids, same tie rules as the torch path:

- Stage A, surrogate (`fast_cpu_surrogate.py`): x sorted once per group (x = (w - min)/s keeps the order of
  w), so both event lists `-½ - x_j` and `L - ½ - x_j` are already sorted, and the prefix sums of h and
  h·(w - min) are computed once per group: the derivative's coefficients on any interval are O(1). A
  two-pointer walk over the events stops at the first interval whose derivative at its right end is >= 0
  (ties: the high-clip event first; a flat interval gives its left end) → Z₁. It starts from the previous
  scale's Z₁ (moved with the scale) instead of −∞, a few events instead of ~G; the start changes no result.
- Stage A, exact window `[Z₁ - 1, Z₁ + 1]` (δ = Z − Z₁ + 1 ∈ [0, 2]): every element with a code change in
  the window crosses first at `d_j ∈ (0, 1]` and again at `d_j + 1`; `f(δ) = f(0) + T0 δ² + 2∫A1` with the
  running sum `A1` dropping by `h_j` at each event. One pass without reductions or scatters (vectorised by
  the compiler) gives every element's residual, d_j and bin; f(0), A1(0) are then four interleaved partial
  sums and each of the 64 bins gets Σh, Σh·e of its events (no sort). f at every bin edge follows, and the
  same sums bound f from below inside a bin (each event's share of ∫A1 lies below its chord over the bin);
  only the bins whose bound beats the best value already found (bin edges included) are swept exactly,
  their few events insertion-sorted. f is accumulated by exact per-interval increments in float64; when the
  minimum is within ~1e-7 of that accumulation's rounding scale (near-lattice groups) it is re-evaluated
  element by element.
- Stage B: s = s₀·i/C (i = C down to 1; ties resolved towards the smaller i as the torch path's ascending
  strict `<` does), then s_c + s₀·j/D (j = −F..F, j ≠ 0, s > 0); every candidate scale is rounded to float32
  first (the stored precision), so the loss compared is the loss of the stored scale; x = (w − min)·(1/s).
  Coarse scales past the optimum (losses rising again) are first checked against a lower bound of their
  loss (the surrogate's minimum less its ¼ per element: Σ h (u² − ¼) over the clipped elements; its walk
  gives Stage A's Z₁ too); a scale whose bound is strictly above the best loss found is skipped: it cannot
  be the argmin. Likewise a window bin whose lower bound is above the best loss found (over s²) is not
  swept. The result is the same as without pruning (tested), except on groups the grid fits to float
  rounding (weights on a lattice, losses 1e-11 and below), where either may pick another candidate as good
  within that rounding (15 of 49,152 adversarial groups).

Everything is float64 inside (the torch path is float32), so on near-ties the two may pick different
(equally good within float32 rounding) candidates; the tests bound the per-group loss against the torch path
and the brute-force references.
"""
from __future__ import annotations

import numpy as np

from neuqi_export.threads import run_rows

try:  # optional dependency
    import numba
    from numba import njit
    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised when numba is absent
    numba = None
    HAVE_NUMBA = False


if HAVE_NUMBA:
    from .fast_cpu_surrogate import _lower_bound, _prefix_sums, _surrogate

    @njit(cache=True, fastmath=False, nogil=True)
    def _stage_a(x, h, T0, L, ws_f, ws_i, z1, thr):
        """x (G,) ascending float64, h (G,) >= 0 aligned, T0 = Σ h > 0, z1 the surrogate's minimiser Z₁
        (`_surrogate`). Returns (Z*, f(Z*)), the exact minimum on [Z₁ − 1, Z₁ + 1], with f = Σ h e² (not
        divided by T0). thr: window bins whose lower bound exceeds it are not swept, so when min f > thr the f
        returned is only known to be > thr (exact whenever it is <= thr). ws_f (4G + 400,) float64 and ws_i
        (G,) int64: scratch."""
        G = x.shape[0]
        nbu = 32
        invT0 = 1.0 / T0
        keys = ws_f[0:G]
        rr = ws_f[G:2 * G]
        ek = ws_f[2 * G:3 * G + 1]
        eh = ws_f[3 * G + 1:4 * G + 2]
        o = 4 * G + 2
        Hb = ws_f[o:o + 3 * nbu + 1]
        HEb = ws_f[o + 3 * nbu + 1:o + 6 * nbu + 2]
        fb = ws_f[o + 6 * nbu + 2:o + 8 * nbu + 3]
        Ab = ws_f[o + 8 * nbu + 3:o + 10 * nbu + 3]
        lb = ws_f[o + 10 * nbu + 3:o + 12 * nbu + 3]
        bins = ws_i[0:G]
        Lm1 = L - 1.0
        # ---------------- exact minimum on [z1 - 1, z1 + 1] ----------------
        # δ = Z - lo ∈ [0, 2]; f(δ) = f(0) + T0 δ² + 2 ∫_0^δ A1, A1 non-increasing (drops by h_j at each event).
        # The window is cut into NB bins; f at every bin edge needs only per-bin sums Σh, Σh·e of the events
        # (∫ A1 over a bin = A1_start·width − Σ_e h (r − e)), no sort. Those sums also bound f from below inside
        # a bin; only bins whose bound beats the best value found so far are swept exactly (their few events
        # insertion-sorted).
        lo = z1 - 1.0
        NB = nbu * 2
        width = 1.0 / nbu
        # one pass free of reductions and scatters (the compiler vectorises it): residual r0 at the window's
        # start, offset d of the first crossing and the slot of every element: its bin among [0, nbu) (both
        # crossings change the clamped code), [nbu, 2 nbu) (only the first: k1 = L − 2), [2 nbu, 3 nbu) (only
        # the second: k1 = −1), or 3 nbu (neither: outside the window's codes)
        for j in range(G):
            v = x[j] + lo
            k1 = np.floor(v + 0.5)
            rr[j] = v - min(max(k1, 0.0), Lm1)
            d = min(max((k1 + 0.5) - v, 0.0), 1.0)
            keys[j] = d
            b = min(int(d * nbu), nbu - 1)
            bins[j] = (b + 2 * nbu if k1 == -1.0 else (b + nbu if k1 == L - 2.0 else (
                3 * nbu if (k1 < -1.0 or k1 > L - 2.0) else b)))
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        g0 = 0.0
        g1 = 0.0
        g2 = 0.0
        g3 = 0.0
        G4 = G & ~3
        for j in range(0, G4, 4):  # four partial sums: A1 = Σ h r0, f0 = Σ h r0²
            t0 = h[j] * rr[j]
            t1 = h[j + 1] * rr[j + 1]
            t2 = h[j + 2] * rr[j + 2]
            t3 = h[j + 3] * rr[j + 3]
            a0 += t0
            a1 += t1
            a2 += t2
            a3 += t3
            g0 += t0 * rr[j]
            g1 += t1 * rr[j + 1]
            g2 += t2 * rr[j + 2]
            g3 += t3 * rr[j + 3]
        for j in range(G4, G):
            t0 = h[j] * rr[j]
            a0 += t0
            g0 += t0 * rr[j]
        A1 = (a0 + a1) + (a2 + a3)
        f0 = (g0 + g1) + (g2 + g3)
        for c in range(3 * nbu + 1):
            Hb[c] = 0.0
            HEb[c] = 0.0
        for j in range(G):
            c = bins[j]
            Hb[c] += h[j]
            HEb[c] += h[j] * keys[j]
        for c in range(nbu):  # phase A (first crossings at d), phase B (second crossings at d + 1)
            hb = Hb[c]
            heb = HEb[c]
            Hb[c] = hb + Hb[nbu + c]
            HEb[c] = heb + HEb[nbu + c]
            Hb[nbu + c] = hb + Hb[2 * nbu + c]
            HEb[nbu + c] = (heb + HEb[2 * nbu + c]) + Hb[nbu + c]
        # f and A1 at every bin's start (two running sums), then each bin's lower bound and the best bin edge
        fl = f0
        A = A1
        for c in range(NB):
            fb[c] = fl
            Ab[c] = A
            r = (c + 1) * width
            fl = fl + width * (T0 * (2 * c + 1) * width + 2.0 * A) - 2.0 * (r * Hb[c] - HEb[c])
            A = A - Hb[c]
        fb[NB] = fl
        for c in range(NB):
            l = c * width
            # inside the bin, Σ_k h_k (δ − e_k)₊ <= (δ − l)·Σ_k h_k (r − e_k)/(r − l) (each term lies below its
            # chord over [l, r]), so A1 >= A1(l) − (Σh·r − Σh·e)/(r − l) in the integral: a lower bound of f
            Aeff = Ab[c] - (Hb[c] * (l + width) - HEb[c]) * nbu
            dd = min(max(-Aeff * invT0, l), l + width)
            lb[c] = fb[c] + (dd - l) * (T0 * (dd + l) + 2.0 * Aeff)
        best_v = f0
        best_d = 0.0
        for c in range(1, NB + 1):
            if fb[c] < best_v:
                best_v = fb[c]
                best_d = c * width
        # sweep the bins whose lower bound beats the best value found so far
        for c in range(NB):
            if not (lb[c] < best_v and lb[c] <= thr):
                continue
            ph = 0 if c < nbu else 1
            bk = c - ph * nbu
            alt = bk + nbu if ph == 0 else bk + 2 * nbu
            m = 0
            for j in range(G):
                if (bins[j] == bk or bins[j] == alt) and h[j] != 0.0:
                    e = keys[j] + ph
                    q = m - 1
                    while q >= 0 and ek[q] > e:
                        ek[q + 1] = ek[q]
                        eh[q + 1] = eh[q]
                        q -= 1
                    ek[q + 1] = e
                    eh[q + 1] = h[j]
                    m += 1
            l = c * width
            fl = fb[c]
            A = Ab[c]
            for p in range(m + 1):
                r = ek[p] if p < m else (c + 1) * width
                dd = -A * invT0
                if dd < l:
                    dd = l
                elif dd > r:
                    dd = r
                val = fl + (dd - l) * (T0 * (dd + l) + 2.0 * A)
                if val < best_v:
                    best_v = val
                    best_d = dd
                fl = fl + (r - l) * (T0 * (r + l) + 2.0 * A)
                l = r
                if p < m:
                    A -= eh[p]
        z = lo + best_d
        # the increments carry an absolute rounding of ~1e-16 x (f(0) + T0 + |A1|): when the minimum is not
        # far above that (near-lattice groups), evaluate f at z element by element instead
        if best_v < 1e-7 * (f0 + 4.0 * T0 + 4.0 * abs(A1)):
            f = 0.0
            for j in range(G):
                u = x[j] + z
                q = np.round(u)
                if q < 0.0:
                    q = 0.0
                elif q > Lm1:
                    q = Lm1
                e = u - q
                f += h[j] * e * e
            return z, f
        return z, best_v

    @njit(cache=True, nogil=True)
    def _search_group(xr, h, s0, L, C, F, D, xs, wsf, wsi, prune):
        """One group: xr (G,) = sorted w - min (float64, >= 0), h normalised; scratch xs (G,), wsf (6G + 402,),
        wsi (G,). Returns (s, zr, loss) with zr the zero-point relative to min (Z = zr - min/s)."""
        G = xr.shape[0]
        Ph = wsf[4 * G + 400:5 * G + 401]  # scale-free prefix sums of h and h·xr (after _stage_a's scratch)
        Phx = wsf[5 * G + 401:6 * G + 402]
        T0 = _prefix_sums(xr, h, Ph, Phx)
        best = np.inf
        best_s = s0
        best_z = 0.0
        zg = -np.inf  # warm start of the surrogate's walk: the last Z₁ found, and its scale
        sg = s0
        # coarse scales from the largest (i = C, the Min-Max scale) down: once the losses have passed the
        # optimum, the strongly clipping small scales are pruned by a lower bound of their loss. Ties go to
        # the smallest i (`<=` in descending order), as the ascending strict `<` of the torch path does.
        rising = False
        for i in range(C, 0, -1):
            s = np.float64(np.float32(np.float32(s0) * np.float32(i / C)))
            inv_s = 1.0 / s
            for j in range(G):
                xs[j] = xr[j] * inv_s
            # the bound is tried only once the losses rise again (past the optimum), where it usually prunes
            start = _shifted(zg, sg, s, L)
            sg = s
            if prune and rising:  # the bound's walk is the surrogate's: its Z₁ serves Stage A too
                fb, zg = _lower_bound(xs, h, L, Ph, Phx, inv_s, start)
                if s * s * fb > best * (1.0 + 1e-9):
                    continue  # strictly worse than a candidate already evaluated: never the argmin
            else:
                zg = _surrogate(xs, Ph, Phx, inv_s, L, start)[0]
            # a scale that cannot reach best needs no exact sweep of its window (`thr`); without pruning,
            # every f is exact
            thr = best * (1.0 + 1e-9) / (s * s) if prune else np.inf
            z, f = _stage_a(xs, h, T0, L, wsf, wsi, zg, thr)
            loss = s * s * f
            rising = loss > best
            if loss <= best:
                best = loss
                best_s = s
                best_z = z
        s_c = best_s
        z_c = best_z
        for jf in range(-F, F + 1):
            if jf == 0:
                continue
            s = np.float64(np.float32(np.float32(s_c) + np.float32(s0) * np.float32(jf / D)))
            if not s > 0.0:
                continue
            inv_s = 1.0 / s
            for j in range(G):
                xs[j] = xr[j] * inv_s
            thr = best * (1.0 + 1e-9) / (s * s) if prune else np.inf
            z1 = _surrogate(xs, Ph, Phx, inv_s, L, _shifted(z_c, s_c, s, L) - 1.0)[0]
            z, f = _stage_a(xs, h, T0, L, wsf, wsi, z1, thr)
            loss = s * s * f
            if loss < best:
                best = loss
                best_s = s
                best_z = z
        return best_s, best_z, best

    @njit(cache=True, nogil=True)
    def _shifted(z, s_from, s, L):
        """A start for the surrogate's walk at scale s from its minimiser z at scale s_from: the grid's centre
        kept at the same weight, less a margin of 0.2 (measured on heavy-tailed groups: the start then lies
        below Z₁ for 93% (4-bit) to 99.6% (2-bit) of consecutive coarse scales; `_surrogate` falls back when
        it does not). −∞ stays −∞."""
        c = 0.5 * (L - 1.0)
        return c - (c - z) * (s_from / s) - 0.2

    @njit(cache=True, nogil=True)
    def _search_all(ws, hs, s0, L, C, F, D, prune, out_s, out_z):
        N, G = ws.shape
        xr = np.empty(G, np.float64)
        h = np.empty(G, np.float64)
        xs = np.empty(G, np.float64)
        wsf = np.empty(6 * G + 402, np.float64)
        wsi = np.empty(G, np.int64)
        for g in range(N):
            wmin = np.float64(ws[g, 0])
            for j in range(G):
                xr[j] = np.float64(ws[g, j]) - wmin
                h[j] = hs[g, j]
            s, zr, _ = _search_group(xr, h, np.float64(s0[g]), L, C, F, D, xs, wsf, wsi, prune)
            out_s[g] = s
            out_z[g] = zr - wmin / s

    @njit(cache=True, nogil=True)
    def _stage_a_all(xsorted, hs, L, zg, out_z, out_f):
        N, G = xsorted.shape
        for g in range(N):
            x = np.empty(G, np.float64)
            h = np.empty(G, np.float64)
            wsf = np.empty(4 * G + 400, np.float64)
            wsi = np.empty(G, np.int64)
            Ph = np.empty(G + 1, np.float64)
            Phx = np.empty(G + 1, np.float64)
            for j in range(G):
                x[j] = xsorted[g, j]
                h[j] = hs[g, j]
            T0 = _prefix_sums(x, h, Ph, Phx)
            z, f = _stage_a(x, h, T0, L, wsf, wsi, _surrogate(x, Ph, Phx, 1.0, L, zg)[0], np.inf)
            out_z[g] = z
            out_f[g] = f / T0


def _run_split(fn, N: int, *arrays_then_scalars_and_outs):
    """Run fn(*args) over row slices [a, b) of every array argument with N rows (threads.run_rows)."""
    args = arrays_then_scalars_and_outs
    run_rows(fn, N, args, tuple(k for k, t in enumerate(args)
                                if isinstance(t, np.ndarray) and t.ndim >= 1 and t.shape[0] == N))


def search_scales(ws, hs, s0, bits: int, coarse: int, fine: int, fine_div: int, prune: bool = True):
    """ws (N, G) float32 sorted ascending per row, hs (N, G) normalised importances aligned with ws,
    s0 (N,) > 0 (torch CPU tensors). Returns (s, z) float32 (N,) torch tensors (z absolute: for w)."""
    import torch
    w = np.ascontiguousarray(ws.numpy(), dtype=np.float32)
    h = np.ascontiguousarray(hs.numpy(), dtype=np.float32)
    s0n = np.ascontiguousarray(s0.numpy(), dtype=np.float32)
    N = w.shape[0]
    out_s = np.empty(N, np.float64)
    out_z = np.empty(N, np.float64)
    _run_split(_search_all, N, w, h, s0n, float(1 << bits), int(coarse), int(fine), int(fine_div), bool(prune), out_s, out_z)
    return torch.from_numpy(out_s).to(torch.float32), torch.from_numpy(out_z).to(torch.float32)


def stage_a(x_sorted, h, bits: int, z_start: float = -np.inf):
    """Stage A alone (for tests): x_sorted (N, G) ascending, h (N, G) >= 0 with Σ h > 0 per row; z_start: where
    the surrogate's walk may start (any value: the result does not depend on it). Returns (Z, f) float64
    numpy (N,), f normalised by Σ h."""
    x = np.ascontiguousarray(np.asarray(x_sorted, dtype=np.float64))
    hh = np.ascontiguousarray(np.asarray(h, dtype=np.float64))
    N = x.shape[0]
    out_z = np.empty(N, np.float64)
    out_f = np.empty(N, np.float64)
    _run_split(_stage_a_all, N, x, hh, float(1 << bits), float(z_start), out_z, out_f)
    return out_z, out_f


__all__ = ["HAVE_NUMBA", "search_scales", "stage_a"]
