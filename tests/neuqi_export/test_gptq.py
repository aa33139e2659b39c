import pytest
import torch

from neuqi_export.gptq import gptq_quantize, weighted_error
from neuqi_export.hessian import HessianAccumulator, damp
from neuqi_export.quant.grid import dequantize, quantize_codes
from neuqi_export.quant.params import init_params


def _layer(out=48, inp=96, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * 0.05
    # correlated activations with uneven scales, like a real layer's inputs
    X = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    X = X * torch.linspace(0.2, 3.0, inp)
    acc = HessianAccumulator(inp)
    acc.add(X)
    return W, X, acc.damped(0.01)


def test_hessian_matches_float64_definition():
    W, X, H = _layer()
    ref = X.double().T @ X.double() / X.shape[0]
    ref += 0.01 * ref.diagonal().mean() * torch.eye(ref.shape[0], dtype=torch.float64)
    assert torch.allclose(H, ref, rtol=1e-10, atol=1e-12)


def test_identity_hessian_gptq_equals_round_to_nearest():
    W, _, _ = _layer()
    scale, zero = init_params(W, 3, 32, method="minmax")
    H = torch.eye(W.shape[1], dtype=torch.float64)
    codes = gptq_quantize(W, H, scale, zero, 3, 32, act_order=False)
    assert torch.equal(codes, quantize_codes(W, scale, zero, 3, 32))


def test_gptq_lowers_the_hessian_error_with_static_groups_and_act_order():
    W, _, H = _layer()
    for bits, gs in [(2, 32), (3, 32), (4, -1)]:
        eff = W.shape[1] if gs == -1 else gs
        scale, zero = init_params(W, bits, gs, method="neuqi", hdiag=H.diagonal().float())
        rtn = dequantize(quantize_codes(W, scale, zero, bits, eff), scale, zero, eff)
        codes = gptq_quantize(W, H, scale, zero, bits, gs, act_order=True)
        assert codes.dtype == torch.uint8 and int(codes.max()) < 2**bits
        gq = dequantize(codes, scale, zero, eff)
        assert weighted_error(W, gq, H) < 0.8 * weighted_error(W, rtn, H)
        # static groups: every code lies on its ORIGINAL group's grid (dequant error bounded by the clamp range)
        lo = dequantize(torch.zeros_like(codes), scale, zero, eff)
        hi = dequantize(torch.full_like(codes, 2**bits - 1), scale, zero, eff)
        assert torch.all(gq >= lo - 1e-6) and torch.all(gq <= hi + 1e-6)


def test_dead_input_columns_do_not_break_gptq():
    W, X, _ = _layer()
    X[:, :5] = 0
    acc = HessianAccumulator(W.shape[1])
    acc.add(X)
    H = acc.damped()
    H[:5, :] = 0
    H[:, :5] = 0
    scale, zero = init_params(W, 4, 32, method="minmax")
    codes = gptq_quantize(W, H, scale, zero, 4, 32)
    assert int(codes.max()) < 16


def test_damp_of_zero_hessian_is_identity():
    assert torch.equal(damp(torch.zeros(3, 3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))


# ---- the numba block loop (gptq_cpu.py) against the torch loop it replaces on CPU -----------------------------

def _hessian(inp, tokens=1024, seed=1, dead=()):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, inp, generator=g) @ (torch.eye(inp) + 0.3 * torch.randn(inp, inp, generator=g))
    X = X * torch.linspace(0.2, 3.0, inp)
    X[:, list(dead)] = 0
    acc = HessianAccumulator(inp)
    acc.add(X)
    return acc.damped(0.01)


@pytest.mark.parametrize("bits,gs,act_order", [(2, 32, True), (3, 128, True), (4, -1, False), (8, 64, True)])
def test_numba_block_loop_gives_the_torch_loops_codes_bit_for_bit(bits, gs, act_order):
    """Uniform grids: the same codes as the reference loop, over row counts that split unevenly over threads,
    input dims that are not a multiple of the block size, dead columns, and weights far outside the grid."""
    from neuqi_export.gptq import use_cpu_kernel

    assert use_cpu_kernel("cpu")  # numba is a dependency: CI runs the kernel, not the fallback
    g = torch.Generator().manual_seed(bits)
    for out, inp in [(37, 200), (130, 320)]:
        W = torch.randn(out, inp, generator=g) * 0.05
        W[0, :7] *= 40  # clamped at both ends
        H = _hessian(inp, dead=(1, inp - 2))
        scale, zero = init_params(W * (torch.rand(out, inp, generator=g) < 0.9), bits, gs, method="minmax")
        ref = gptq_quantize(W, H, scale, zero, bits, gs, act_order=act_order, impl="torch")
        fast = gptq_quantize(W, H, scale, zero, bits, gs, act_order=act_order, impl="numba")
        assert torch.equal(ref, fast)


@pytest.mark.parametrize("affine", [True, False])
def test_numba_block_loop_on_value_tables_matches_the_torch_loop(affine):
    """Per-sub-block value tables (GGUF lattices): affine (incl. a zero step and exact midpoints between values)
    and a non-uniform code book; bit-identical codes."""
    from neuqi_export.gptq import TableColumns, gptq_with_rounding

    g = torch.Generator().manual_seed(3)
    out, inp, B, K = 70, 256, 16, (8 if affine else 16)
    W = torch.randn(out, inp, generator=g) * 0.05
    if affine:
        V = torch.randn(out, inp // B, 1, generator=g) * 0.05 + (torch.rand(out, inp // B, 1, generator=g) * 0.02
                                                                 * torch.arange(K))
        V[0, 0] = 0.01  # all K values equal: step 0
        W[1, :B] = (V[1, 0, 0] + V[1, 0, 1]) / 2  # exact midpoints between two values
    else:
        V = torch.sort(torch.randn(out, inp // B, K, generator=g) * 0.05, -1).values
    H = _hessian(inp)
    grid = TableColumns(V, B, affine)
    assert torch.equal(gptq_with_rounding(W, H, grid, impl="torch"), gptq_with_rounding(W, H, grid, impl="numba"))


def test_gptq_impl_choice():
    from neuqi_export.gptq import use_cpu_kernel

    assert not use_cpu_kernel("cpu", "torch") and not use_cpu_kernel("cuda", "auto")
    with pytest.raises(ValueError):
        use_cpu_kernel("cpu", "fast")
