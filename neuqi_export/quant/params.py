"""Stage B of NeUQI (the scale search) and the initialisations that ship beside it (NEUQI.md).

`init_params(weight, bits, group_size, method, hdiag)` returns per-(row, group) `scale` and `zero`
(float32, (out, n_groups)) with dequant `ŵ = scale * (q - zero)`, `q = clamp(round(w / scale + zero), 0, L-1)`.

Methods (all minimise, or are judged by, the diag-H loss Σ_j h_j (w_j − ŵ_j)² of each group):

- ``minmax``: s = s₀ = (max − min)/(L − 1), Z = round(−min/s₀) (an integer).
- ``mse``: NeUQI's Stage A + B with h ≡ 1 (data-free).
- ``neuqi_int``: Z restricted to the integers 0..L−1 (what integer-zero-point formats hold); for every
  candidate scale the best integer Z is exact (the loss is discretely convex in integer Z: binary search
  on its forward difference). Scales: ``int_grid="coarse_fine"`` (default: the same 64 + 32 grid as
  ``neuqi``, resolution s₀/2048 around the best coarse scale) or ``"dense"`` (NEUQI.md's wording: every
  s₀·i/2048, i = 1..2048; ~20x the cost, and on heavy-tailed layers measured no better, because it
  stops at s₀ while the fine grid also looks just above it). The Min-Max point (s₀, round(−min/s₀)) is
  always one of the candidates, so the result is never worse than ``minmax`` (its Z can then lie outside 0..L−1, exactly
  where Min-Max's does: groups not containing 0).
- ``neuqi``: coarse s = s₀·i/64 (i = 1..64; i = 64 is the Min-Max scale), then fine s_c + s₀·j/2048
  (j = −16..16, j ≠ 0, s > 0), each solved exactly in Z by Stage A; the lowest s²·f(Z*) wins.

Everything is vectorised over all (row, group) pairs of a layer (chunked to bound memory; a Python loop
runs only over the scale candidates), float32 on the device of `weight`. ``neuqi``/``mse``/``neuqi_int``
also have compiled kernels with the same grids, method and tie rules, chosen by ``impl="auto"`` (the
default): on the CPU the numba kernels of `fast_cpu.py` (neuqi/mse; float64 inside, ~20-40x this path's
throughput per CPU-second, docs/BENCH_INIT_CPU.md) and `fast_cpu_int.py` (neuqi_int) when the optional
package numba is installed; on CUDA the Triton kernels of `fast_triton.py` / `fast_triton_int.py` when
triton is installed (groups of up to 256 weights; longer per-channel rows stay on the torch path; a kernel
that fails to compile falls back to the torch path with one warning). ``impl="reference"`` forces this
torch path, which is also the fallback without them; ``impl="triton"`` on a CPU tensor runs the Triton
kernel in Triton's interpreter (TRITON_INTERPRET=1, for tests). Full groups and the shorter last group
(in_features not a multiple of the group size) are two batches. A constant group (max = min, or a
range below (L−1)·2⁻¹⁴ of its magnitude, where a float32 zero-point could not place the grid) gets
s = |c|/(L−1) with Z = 0 (c > 0) or Z = L−1 (c < 0), which reproduces c; an all-zero group gets
s = 2⁻²⁴, Z = 0.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..errors import UserError
from .grid import n_groups, quantize_codes
from . import fast_cpu as _fast
from . import fast_cpu_int as _fast_int
from .zeropoint import VALID_BITS, _check_bits, stage_a_sorted

METHODS = ("minmax", "mse", "neuqi_int", "neuqi")
_DEFAULTS = dict(coarse=64, fine=16, fine_div=2048, int_grid="coarse_fine", chunk_elems=None, refine=2, impl="auto",
                 triton_config=None)
IMPLS = ("auto", "reference", "numba", "triton")
_FAST_METHODS = ("neuqi", "mse", "neuqi_int")  # the methods with compiled kernels (numba on CPU, Triton on CUDA)
_ZERO_GROUP_SCALE = 2.0 ** -24
_DEGENERATE_RATIO = 2.0 ** 14  # max|w| / s₀ above this: treat the group as constant
_TRITON_MAX_GROUP = 256  # fast_triton.MAX_GROUP; longer groups take the torch path


def _check_group_size(group_size) -> int:
    ok = isinstance(group_size, int) and not isinstance(group_size, bool) and (
        group_size == -1 or (group_size > 0 and group_size & (group_size - 1) == 0))
    if not ok:
        raise UserError(f"group_size={group_size!r} is invalid; use a positive power of two (e.g. 32, 64, 128) "
                        "or -1 for per-channel")
    return group_size


def _options(grid_options: dict) -> dict:
    unknown = set(grid_options) - set(_DEFAULTS)
    if unknown:
        raise UserError(f"unknown init option(s) {sorted(unknown)}; known: {sorted(_DEFAULTS)}")
    opts = {**_DEFAULTS, **grid_options}
    for k in ("coarse", "fine_div", "refine"):
        if not isinstance(opts[k], int) or opts[k] < 1:
            raise UserError(f"{k}={opts[k]!r} must be a positive integer")
    if not isinstance(opts["fine"], int) or opts["fine"] < 0:
        raise UserError(f"fine={opts['fine']!r} must be a non-negative integer")
    if opts["impl"] not in IMPLS:
        raise UserError(f"impl={opts['impl']!r} is unknown; use one of {', '.join(IMPLS)}")
    if opts["impl"] == "numba" and not _fast.HAVE_NUMBA:
        raise UserError("impl='numba' needs the optional package numba (pip install numba); use impl='auto'")
    if opts["impl"] == "triton" and not _have_triton():
        raise UserError("impl='triton' needs the optional package triton (pip install triton); use impl='auto'")
    tc = opts["triton_config"]
    if tc is not None and not (isinstance(tc, (tuple, list)) and len(tc) == 2 and all(
            isinstance(v, int) and v > 0 and v & (v - 1) == 0 for v in tc)):
        raise UserError(f"triton_config={tc!r} must be (rows_per_program, num_warps), two powers of two, or None")
    if opts["int_grid"] not in ("dense", "coarse_fine"):
        raise UserError(f"int_grid={opts['int_grid']!r} is unknown; use 'dense' or 'coarse_fine'")
    return opts


_TRITON_OK = None
_TRITON_BROKEN = False  # set when the Triton kernel failed under impl='auto': the torch path from then on


def _have_triton() -> bool:
    """Whether the optional package triton imports (checked once)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = True
        except Exception:
            _TRITON_OK = False
    return _TRITON_OK


def _check_weight(weight: Tensor) -> None:
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.numel() == 0:
        raise UserError("weight must be a non-empty 2-D tensor (out_features, in_features)")
    if not weight.is_floating_point():
        raise UserError(f"weight has dtype {weight.dtype}; pass a floating-point weight")
    if not torch.isfinite(weight).all():
        raise UserError("a weight contains NaN/Inf; repair the model before quantizing")


def _check_hdiag(hdiag: Tensor | None, in_features: int) -> None:
    if hdiag is None:
        return
    if not isinstance(hdiag, Tensor) or hdiag.shape != (in_features,):
        shape = tuple(hdiag.shape) if isinstance(hdiag, Tensor) else type(hdiag).__name__
        raise UserError(f"hdiag has shape {shape}; pass diag(H) of shape ({in_features},) or None")
    if not torch.isfinite(hdiag).all() or (hdiag < 0).any():
        raise UserError("hdiag contains NaN/Inf or negative values; pass the damped diag(H) (all >= 0)")


def _split(in_features: int, group_size: int) -> tuple[int, int, int]:
    """(effective group size, # full groups, tail length)."""
    gs = in_features if group_size == -1 else group_size
    return gs, in_features // gs, in_features % gs


# --------------------------------------------------------------------------------------------------
# per-batch fitting: wg (N, G) rows = groups, hg (N, G) or None


def _prep(wg: Tensor, hg: Tensor | None, L: int):
    ws, perm = torch.sort(wg, dim=-1, stable=True)
    if hg is None:
        hs = torch.ones_like(ws)
    else:
        hs = hg.gather(1, perm)
        hs = torch.where(hs.sum(-1, keepdim=True) > 0, hs, torch.ones_like(hs))
    hs = hs / hs.sum(-1, keepdim=True)
    wmin, wmax = ws[:, 0], ws[:, -1]
    s0 = (wmax - wmin) / (L - 1)
    mag = torch.maximum(wmin.abs(), wmax.abs())
    degenerate = ~(s0 > 0) | (mag > _DEGENERATE_RATIO * s0) | ~torch.isfinite(mag / s0)
    s0 = torch.where(degenerate, torch.ones_like(s0), s0)
    return ws, hs, wmin, s0, degenerate


def _constant_params(ws: Tensor, L: int) -> tuple[Tensor, Tensor]:
    c = 0.5 * (ws[:, 0] + ws[:, -1])
    s = torch.where(c != 0, c.abs() / (L - 1), torch.full_like(c, _ZERO_GROUP_SCALE))
    z = torch.where(c < 0, torch.full_like(c, float(L - 1)), torch.zeros_like(c))
    return s, z


def _int_best_zero(x: Tensor, hs: Tensor, L: int) -> tuple[Tensor, Tensor]:
    """Best integer Z in 0..L-1 for absolute coordinates x = w/s (N, G), h normalised.
    For integer Z, round(x + Z) = round(x) + Z, so e = r + min(k+Z, 0) + max(k+Z-(L-1), 0) with
    k = round(x), r = x - k (exact): every element's error is a discretely convex function of Z, hence
    so is the loss; binary search on the forward difference. Returns (Z, f(Z)) each (N,)."""
    k = torch.round(x)
    r = x - k

    def f(Z):  # Z (N,) float integers
        kz = k + Z.unsqueeze(1)
        e = r + kz.clamp(max=0) + (kz - (L - 1)).clamp(min=0)
        return (hs * e * e).sum(-1)

    lo = torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
    hi = torch.full_like(lo, float(L - 1))
    for _ in range(int(math.ceil(math.log2(L)))):
        mid = torch.floor((lo + hi) / 2)
        up = f(mid + 1) - f(mid) >= 0  # min at or below mid
        act = lo < hi
        hi = torch.where(act & up, mid, hi)
        lo = torch.where(act & ~up, mid + 1, lo)
    return lo, f(lo)


def _abs_loss(x: Tensor, hs: Tensor, Z: Tensor, L: int) -> Tensor:
    """f at integer or float Z in absolute coordinates (N,), float32."""
    u = x + Z.unsqueeze(1)
    e = u - torch.round(u).clamp(0, L - 1)
    return (hs * e * e).sum(-1)


def _int_fractions(opts: dict) -> tuple[list[float], list[float]]:
    """neuqi_int's candidate scales as fractions of s₀: coarse s₀·fr (in this order), then fine s_c + s₀·fr."""
    D = opts["fine_div"]
    if opts["int_grid"] == "dense":
        return [i / D for i in range(1, D + 1)], []
    C, F = opts["coarse"], opts["fine"]
    return [i / C for i in range(1, C + 1)], [j / D for j in range(-F, F + 1) if j != 0]


def _fast_search(ws: Tensor, hs: Tensor, s0: Tensor, bits: int, method: str, opts: dict):
    """(s, z) from a compiled kernel when one is selected for this batch (Triton on CUDA, numba on the CPU),
    else None (the torch path runs). Under impl='auto' a Triton kernel that fails to compile or launch
    (an old triton, an unsupported GPU) is reported once and the torch path takes over for the session."""
    global _TRITON_BROKEN
    if method not in _FAST_METHODS:
        return None
    if opts.get("_triton", False) and ws.shape[1] <= _TRITON_MAX_GROUP:
        rp, nw = opts["triton_config"] or (None, None)
        try:
            if method == "neuqi_int":
                from . import fast_triton_int  # lazy: triton is optional
                return fast_triton_int.search_scales_int(ws, hs, s0, bits, *_int_fractions(opts),
                                                         rows_per_program=rp, num_warps=nw)
            from . import fast_triton
            return fast_triton.search_scales(ws, hs, s0, bits, opts["coarse"], opts["fine"], opts["fine_div"],
                                             rows_per_program=rp, num_warps=nw)
        except Exception as e:  # noqa: BLE001 - any compiler/driver failure: fall back, loudly
            if opts["impl"] != "auto" or isinstance(e, UserError):
                raise
            warnings.warn(f"the Triton kernel failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          "using the torch path (slower, same result); impl='reference' silences this", stacklevel=2)
            _TRITON_BROKEN = True
            opts["_triton"] = False
            return None
    if opts.get("_fast", False):
        if method == "neuqi_int":
            return _fast_int.search_scales_int(ws, hs, s0, bits, *_int_fractions(opts))
        return _fast.search_scales(ws, hs, s0, bits, opts["coarse"], opts["fine"], opts["fine_div"])
    return None


def _fit_batch(wg: Tensor, hg: Tensor | None, bits: int, method: str, opts: dict) -> tuple[Tensor, Tensor]:
    L = 1 << bits
    ws, hs, wmin, s0, degenerate = _prep(wg, hg, L)
    fast = _fast_search(ws, hs, s0, bits, method, opts)
    if fast is not None:
        s, z = fast
    elif method == "minmax":
        s, z = s0, torch.round(-wmin / s0)
    elif method in ("neuqi", "mse"):
        xr = ws - wmin.unsqueeze(1)  # >= 0; the zero-point is solved relative to min and shifted back
        best = torch.full_like(s0, float("inf"))
        best_s, best_z = s0.clone(), torch.zeros_like(s0)

        def consider(s, valid=None):
            nonlocal best, best_s, best_z
            zr, f = stage_a_sorted(xr / s.unsqueeze(1), hs, bits, refine=opts["refine"])
            loss = s * s * f
            if valid is not None:
                loss = torch.where(valid, loss, torch.full_like(loss, float("inf")))
            better = loss < best
            best = torch.where(better, loss, best)
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, zr, best_z)

        C = opts["coarse"]
        for i in range(1, C + 1):
            consider(s0 * (i / C))  # i = C is exactly s0, the Min-Max scale
        s_c = best_s.clone()
        for j in range(-opts["fine"], opts["fine"] + 1):
            if j == 0:
                continue
            s = s_c + s0 * (j / opts["fine_div"])
            valid = s > 0
            consider(torch.where(valid, s, s0), valid)
        s, z = best_s, best_z - wmin / best_s
    elif method == "neuqi_int":
        # the Min-Max point first: it is always a candidate
        s = s0.clone()
        z = torch.round(-wmin / s0)
        best = s0 * s0 * _abs_loss(ws / s0.unsqueeze(1), hs, z, L)

        def consider_int(sc, valid=None):
            nonlocal best, s, z
            zc, f = _int_best_zero(ws / sc.unsqueeze(1), hs, L)
            loss = sc * sc * f
            if valid is not None:
                loss = torch.where(valid, loss, torch.full_like(loss, float("inf")))
            better = loss < best
            best = torch.where(better, loss, best)
            s = torch.where(better, sc, s)
            z = torch.where(better, zc, z)

        coarse_fr, fine_fr = _int_fractions(opts)
        for fr in coarse_fr:
            consider_int(s0 * fr)
        s_c = s.clone()
        for fr in fine_fr:
            sc = s_c + s0 * fr
            valid = sc > 0
            consider_int(torch.where(valid, sc, s0), valid)
    else:  # pragma: no cover - validated before
        raise UserError(f"unknown method {method!r}")
    cs, cz = _constant_params(ws, L)
    s = torch.where(degenerate, cs, s)
    z = torch.where(degenerate, cz, z)
    return s.to(torch.float32), z.to(torch.float32)


def _fit_groups(wg: Tensor, hg_rows: Tensor | None, rows: int, bits: int, method: str, opts: dict,
                chunk_elems: int) -> tuple[Tensor, Tensor]:
    """wg: (out * g_per_row, G) groups, row-major; hg_rows: (g_per_row, G) per-group h of one row (or None)."""
    N, G = wg.shape
    gpr = N // rows
    rows_per_chunk = max(1, chunk_elems // max(1, gpr * G))
    s_out = torch.empty(N, dtype=torch.float32, device=wg.device)
    z_out = torch.empty(N, dtype=torch.float32, device=wg.device)
    for r0 in range(0, rows, rows_per_chunk):
        r1 = min(rows, r0 + rows_per_chunk)
        a, b = r0 * gpr, r1 * gpr
        hg = None if hg_rows is None else hg_rows.repeat(r1 - r0, 1)
        s, z = _fit_batch(wg[a:b], hg, bits, method, opts)
        s_out[a:b] = s
        z_out[a:b] = z
    return s_out, z_out


def init_params(weight: Tensor, bits: int, group_size: int, method: str = "neuqi", hdiag: Tensor | None = None,
                **grid_options) -> tuple[Tensor, Tensor]:
    """weight (out, in); hdiag (in,) or None (h ≡ 1). Returns scale, zero float32 of shape (out, n_groups),
    n_groups = ceil(in / group_size); group_size = -1 means per-channel (one group = the whole row).
    methods: minmax, mse, neuqi_int, neuqi. Dequant is scale * (q - zero) with q = clamp(round(w/scale + zero), 0, 2^bits-1).

    minmax and mse ignore hdiag (Min-Max has no objective; mse is h ≡ 1 by definition).
    grid_options: coarse=64, fine=16, fine_div=2048 (Stage B grid), int_grid='coarse_fine'|'dense'
    (neuqi_int's scale grid), chunk_elems (group elements per batch; default 2**16 on CPU, 2**22 on GPU),
    refine=2 (Stage A candidates re-evaluated element-wise; torch path only),
    impl='auto'|'reference'|'numba'|'triton' (neuqi/mse/neuqi_int: 'auto' uses the numba kernels on CPU when
    numba is installed and the Triton kernels on CUDA when triton is installed, else the torch path;
    'reference' forces the torch path), triton_config=(rows_per_program, num_warps) (Triton launch shape,
    for tuning; None = the kernel's default)."""
    bits = _check_bits(bits)
    group_size = _check_group_size(group_size)
    if method not in METHODS:
        raise UserError(f"init method {method!r} is unknown; use one of {', '.join(METHODS)}")
    _check_weight(weight)
    out, inf = weight.shape
    _check_hdiag(hdiag, inf)
    opts = _options(grid_options)
    # the compiled CPU kernels (numba): optional, the torch path is the fallback and the reference
    opts["_fast"] = (method in _FAST_METHODS and weight.device.type == "cpu" and _fast.HAVE_NUMBA
                     and opts["impl"] in ("auto", "numba"))
    # the Triton kernels on CUDA (impl='triton' forces them, e.g. on CPU under TRITON_INTERPRET=1)
    opts["_triton"] = (method in _FAST_METHODS and (opts["impl"] == "triton" or (
        opts["impl"] == "auto" and weight.device.type == "cuda" and not _TRITON_BROKEN and _have_triton())))
    # CPU: small batches stay in cache (measured fastest); GPU: big batches, temporaries well under 1 GB;
    # the compiled path streams each group once, so its batches only bound the float32 copies
    big = weight.device.type == "cuda" or opts["_fast"] or opts["_triton"]
    chunk = opts["chunk_elems"] or (1 << 22 if big else 1 << 16)
    W = weight.detach().to(torch.float32)
    h = None
    if hdiag is not None and method in ("neuqi", "neuqi_int"):
        h = hdiag.detach().to(W.device, torch.float32)
    gs, nfull, tail = _split(inf, group_size)
    ng = n_groups(inf, group_size)
    scale = torch.empty(out, ng, dtype=torch.float32, device=W.device)
    zero = torch.empty_like(scale)
    with torch.no_grad():
        if nfull:
            wg = W[:, :nfull * gs].reshape(out * nfull, gs)
            hg = None if h is None else h[:nfull * gs].reshape(nfull, gs)
            s, z = _fit_groups(wg, hg, out, bits, method, opts, chunk)
            scale[:, :nfull] = s.reshape(out, nfull)
            zero[:, :nfull] = z.reshape(out, nfull)
        if tail:
            wg = W[:, nfull * gs:].contiguous()
            hg = None if h is None else h[nfull * gs:].reshape(1, tail)
            s, z = _fit_groups(wg, hg, out, bits, method, opts, chunk)
            scale[:, nfull] = s
            zero[:, nfull] = z
    return scale, zero


def group_loss(weight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int,
               hdiag: Tensor | None = None) -> Tensor:
    """(out, n_groups) float64: Σ_j h_j (w_j − ŵ_j)² per group (h not normalised; h ≡ 1 if None), with the
    codes computed exactly as deployed (float32) and ŵ = s (q − Z) evaluated in float64."""
    out, inf = weight.shape
    gs, nfull, tail = _split(inf, group_size)
    ng = n_groups(inf, group_size)
    q = quantize_codes(weight, scale, zero, bits, gs).to(torch.float64)
    s = scale.to(weight.device, torch.float64).repeat_interleave(gs, dim=1)[:, :inf]
    z = zero.to(weight.device, torch.float64).repeat_interleave(gs, dim=1)[:, :inf]
    d = weight.to(torch.float64) - s * (q - z)
    e = d * d
    if hdiag is not None:
        e = e * hdiag.to(weight.device, torch.float64).unsqueeze(0)
    pad = ng * gs - inf
    if pad:
        e = torch.nn.functional.pad(e, (0, pad))
    return e.reshape(out, ng, gs).sum(-1)


__all__ = ["init_params", "group_loss", "METHODS", "VALID_BITS"]
