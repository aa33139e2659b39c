"""The optional Triton kernel (neuqi_export/quant/fast_triton.py) against the torch reference path of init_params.

CI has no GPU, so the kernel runs in Triton's CPU interpreter. TRITON_INTERPRET=1 must be set before the kernels
are decorated (at the first import of fast_triton), so the kernel runs in a child process started with it; the
child writes (scale, zero) of every case to a file and this process compares the per-group losses with the
torch path (impl="reference").
"""
import sys

import pytest
import torch

from neuqi_export.errors import UserError
from neuqi_export.quant import params
from neuqi_export.quant.grid import n_groups
from neuqi_export.quant.params import group_loss, init_params
from triton_harness import case_weights, child_fixtures, compile_sm90, compiled

RTOL = 1e-5  # per group: float32 rounding of the loss (measured max 1.1e-6 on 512 x 328 layers)

# (name, rows, cols, group size, bits, method): heavy-tailed weights, random positive diag(H)
CASES = [(f"g{gs}-{bits}b", 16, 256, gs, bits, "neuqi") for gs in (128, 64, 32) for bits in (2, 3, 4)]
CASES += [("mse-g128-2b", 16, 256, 128, 2, "mse"), ("mse-g64-3b", 16, 256, 64, 3, "mse"),
          ("mse-g32-4b", 16, 256, 32, 4, "mse"),
          # 200 columns: g64 leaves a ragged last group of 8; per-channel is one 200-wide group (256 lanes);
          # special rows: an all-zero group, a constant group, h with zeros
          ("ragged-g64-3b", 8, 200, 64, 3, "neuqi"), ("perchannel-2b", 8, 200, -1, 2, "neuqi"),
          ("g128-8b", 8, 256, 128, 8, "neuqi")]


def _weights(rows, cols, seed):
    return case_weights(rows, cols, seed)


def _run_child(out_path: str) -> None:
    """Runs under TRITON_INTERPRET=1: every case through init_params(impl="triton"), plus a check of the real
    tl.sort (bitonic network, interpreted) on the kernel's packed keys against torch.sort."""
    global fast_triton  # the interpreter resolves names in the kernel's module globals
    import triton
    import triton.language as tl

    from neuqi_export.quant import fast_triton

    assert fast_triton.INTERPRET
    torch.set_num_threads(1)
    res = {}
    for i, (name, rows, cols, gs, bits, method) in enumerate(CASES):
        W, h = _weights(rows, cols, seed=i)
        s, z = init_params(W, bits, gs, method, hdiag=h, impl="triton")
        res[name] = (s, z)

    @triton.jit
    def sort_keys(e_ptr, out_ptr, B: tl.constexpr):
        lane = tl.arange(0, B)[None, :]
        E = tl.load(e_ptr + tl.arange(0, 2)[:, None] * B + lane)
        keys = fast_triton._event_keys(E, lane) | (1 << 30)
        tl.store(out_ptr + tl.arange(0, 2)[:, None] * B + lane, tl.sort(keys, dim=1))

    @triton.jit
    def surrogate_merge(u_ptr, keys_ptr, out_ptr, L: tl.constexpr, B: tl.constexpr, NDIM: tl.constexpr):
        u = tl.load(u_ptr + tl.arange(0, 4)[:, None] * B + tl.arange(0, B)[None, :])
        keys = fast_triton._surrogate_keys(u, L, B)
        merged = tl.reshape(fast_triton._bitonic_merge_hypercube(tl.reshape(keys, [2] * NDIM), NDIM - 2, 0),
                            keys.shape)
        offs = tl.arange(0, 4)[:, None] * (2 * B) + tl.arange(0, 2 * B)[None, :]
        tl.store(keys_ptr + offs, keys)
        tl.store(out_ptr + offs, merged)

    # the surrogate's event keys through the REAL merge network (interpreted; the kernel's interpreter path uses
    # numpy's sort): sorted u with duplicate values and a padded tail repeating the maximum, as the kernel sees
    g = torch.Generator().manual_seed(5)
    U = torch.sort(torch.round(torch.randn(4, 32, generator=g) * 4) / 2, dim=1).values  # many exact ties
    U[1] = torch.sort(torch.randn(32, generator=g) * 3).values  # distinct values
    U[2, 20:] = U[2, 19]  # padding: the maximum repeated
    U[3] = 0.5  # one value
    keys, merged = torch.empty(4, 64, dtype=torch.int64), torch.empty(4, 64, dtype=torch.int64)
    surrogate_merge[(1,)](U, keys, merged, L=4, B=32, NDIM=8)
    res["_merge"] = (U, keys, merged)

    # the lower-bound pruning is exact: one group per program (each prunes on its own) == no pruning
    from neuqi_export.quant.params import _prep
    W, h = _weights(4, 64, seed=99)
    ws, hs, _, s0, _ = _prep(W, h.reshape(1, 64).repeat(4, 1), 16)
    stage_a, calls = fast_triton._stage_a, []

    def counted(*args):  # the interpreter looks the helper up in the module at every call
        calls.append(1)
        return stage_a(*args)

    fast_triton._stage_a = counted
    res["_prune"] = [fast_triton.search_scales(ws, hs, s0, 4, 64, 16, 2048, prune=p, rows_per_program=r)
                     for p, r in ((True, 1), (False, 4))]
    fast_triton._stage_a = stage_a
    res["_prune_solves"] = (len(calls) - 96, 4 * 96)  # Stage-A solves with pruning (4 programs), without

    E = torch.tensor([[-3.5, 2.25, -0.0, 0.0, 7.0, -7.0, 1e-30, -1e-30] * 2, [0.5, -0.5, 3.0, 3.0] * 4])
    out = torch.empty(2, 16, dtype=torch.int64)
    sort_keys[(1,)](E, out, B=16)
    res["_sort"] = (E, out)
    torch.save(res, out_path)


_child, triton_results = child_fixtures(__file__, "triton", "triton_results")  # the interpreter run, started at the first test


def test_triton_is_installed():
    """triton is in the `test` extra: CI must exercise the kernel (in the interpreter), never skip it."""
    import triton  # noqa: F401
    assert params._have_triton()
    from neuqi_export.quant import fast_triton
    assert fast_triton.HAVE_MERGE  # the pinned triton has the merge network the surrogate uses


def _compile_for_h100(B: int, R: int) -> tuple[int, bool, int, int]:
    """The kernel compiled for sm_90 with 4 warps: (cubin bytes, PTX has an fp32 FMA, registers, local bytes)."""
    from neuqi_export.quant import fast_triton
    return compile_sm90(fast_triton._search_kernel, ("ws_ptr", "hs_ptr", "s0_ptr", "fr_ptr", "s_out", "z_out"),
                        ("N", "G", "C", "NF"), {"L": 4, "R": R, "B": B, "PRUNE": True,
                         "NDIM": (R * 2 * B).bit_length() - 1, "STAGE": (2 * B).bit_length() - 1}, num_warps=4)


@pytest.mark.parametrize("B,R", [(128, 4), (32, 8)])
def test_kernel_compiles_for_h100(B, R):
    """The kernel lowers to a cubin for sm_90 with Triton's bundled ptxas (no GPU needed), without FMA
    contraction (the candidate scales keep the torch path's bits) and without spills at g128 (measured 168
    registers at B = 128)."""
    from neuqi_export.quant import fast_triton
    size, fma, regs, local = compiled("test_fast_triton", "_compile_for_h100", (B, R), fast_triton.INTERPRET)
    print(f"B={B} R={R}: {regs} registers, {local} bytes local memory")
    assert size > 0
    assert not fma
    assert local == 0 or B != 128


def test_dispatch_and_errors(monkeypatch):
    from neuqi_export.quant import fast_triton

    W = torch.randn(2, 1100) * 0.02
    if not fast_triton.INTERPRET:
        with pytest.raises(UserError, match="TRITON_INTERPRET"):
            init_params(W[:, :256], 3, 128, "neuqi", impl="triton")  # a CPU tensor, no interpreter here
    # per-channel rows longer than fast_triton.MAX_GROUP stay on the torch path, also when triton is forced
    ref = init_params(W, 3, -1, "neuqi", impl="reference")
    got = init_params(W, 3, -1, "neuqi", impl="triton")
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
    # minmax ignores impl; CPU 'auto' never picks the Triton path
    assert torch.equal(init_params(W, 2, 128, "minmax", impl="triton")[0], init_params(W, 2, 128, "minmax")[0])
    monkeypatch.setattr(params, "_TRITON_OK", False)
    with pytest.raises(UserError, match="pip install triton"):
        init_params(W, 3, 128, "neuqi", impl="triton")
    auto = init_params(W[:, :256], 3, 128, "neuqi")  # without triton: unchanged CPU path
    assert torch.isfinite(auto[0]).all()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(triton_results, case):
    """Every group's loss equals the torch path's within float32 rounding; the sum is never worse."""
    name, rows, cols, gs, bits, method = case
    W, h = _weights(rows, cols, seed=CASES.index(case))
    s, z = triton_results[name]
    assert s.shape == z.shape == (rows, n_groups(cols, gs)) and s.dtype == z.dtype == torch.float32
    assert torch.all(s > 0) and torch.all(torch.isfinite(z))
    rs, rz = init_params(W, bits, gs, method, hdiag=h, impl="reference")
    hd = h if method == "neuqi" else None
    lt = group_loss(W, s, z, bits, gs, hd)
    lr = group_loss(W, rs, rz, bits, gs, hd)
    mm = group_loss(W, *init_params(W, bits, gs, "minmax"), bits, gs, hd)
    tiny = 1e-30
    rel = ((lt - lr).abs() / lr.clamp_min(tiny)).max()
    assert torch.all((lt - lr).abs() <= RTOL * lr + tiny), (name, float(rel))
    assert lt.sum() <= lr.sum() * (1 + 1e-6), (name, float(lt.sum() / lr.sum()))
    assert torch.all(lt <= mm * (1 + RTOL) + tiny)
    print(f"{name}: max |loss/ref - 1| = {float(rel):.2e}, sum ratio - 1 = {float(lt.sum() / lr.sum() - 1):+.2e}")


def test_real_tl_sort_on_packed_keys(triton_results):
    """The keys the kernel sorts (order-preserving float bits | tag | lane) sort like the floats under tl.sort."""
    E, out = triton_results["_sort"]
    for r in range(2):
        lanes = out[r] & 0x3FFFFFFF
        assert sorted(lanes.tolist()) == list(range(16)) and torch.all(((out[r] >> 30) & 1) == 1)
        got = E[r][lanes]
        assert torch.equal(got, torch.sort(E[r]).values)  # ascending floats (-0.0 just before +0.0)
        bits = got.view(torch.int32)
        assert torch.all(bits[got == 0] == torch.sort(bits[got == 0]).values)  # -0.0 (int bits < 0) first
        ties = bits[1:] == bits[:-1]
        assert torch.all(lanes[1:][ties] > lanes[:-1][ties])  # equal floats: by lane


def test_surrogate_keys_merge_like_a_sort(triton_results):
    """The surrogate's 2B event keys are bitonic per row, Triton's bitonic merge network (the one the kernel runs)
    sorts them exactly like a full sort, and the decoded events are -½ - u and L - ½ - u of every lane once each
    (E2 before E1 on equal values)."""
    U, keys, merged = triton_results["_merge"]
    B, L = U.shape[1], 4
    for r in range(U.shape[0]):
        k = keys[r]
        d = torch.sign(k[1:] - k[:-1])
        peak = int(torch.argmax(k))
        assert torch.all(d[:peak] >= 0) and torch.all(d[peak:] <= 0), r  # ascending, then descending
        assert torch.equal(merged[r], torch.sort(k).values), r
        lane = (B - 1) - (merged[r] & 0x3FFFFFFF)
        is1 = ((merged[r] >> 30) & 1) == 1
        sb = merged[r] >> 31
        E = torch.where(sb >= 0x80000000, sb - 0x80000000, -1 - sb).to(torch.int32).view(torch.float32)
        want = torch.where(is1, -0.5 - U[r][lane], (L - 0.5) - U[r][lane])
        assert torch.equal(E, want), r
        assert sorted(lane[is1].tolist()) == list(range(B)) == sorted(lane[~is1].tolist())
        tie = E[1:] == E[:-1]
        assert not torch.any(is1[:-1][tie] & ~is1[1:][tie]), r  # never an E1 just before an equal E2


def test_pruning_is_exact(triton_results):
    (ps, pz), (ns, nz) = triton_results["_prune"]
    assert torch.equal(ps, ns) and torch.equal(pz, nz)
    solved, total = triton_results["_prune_solves"]
    assert solved < 0.9 * total, (solved, total)  # the bound did skip scales (measured: 264 of 384)
    print(f"pruning: {solved} of {total} Stage-A solves")


if __name__ == "__main__":
    _run_child(sys.argv[1])
