"""Per-group grid helpers: group counts, expansion, quantize/dequantize round trips, ragged groups."""
import pytest
import torch

from neuqi_export.quant.grid import dequantize, expand_groups, n_groups, quantize_codes, quantize_column


def test_n_groups():
    assert n_groups(4096, 128) == 32
    assert n_groups(576, 128) == 5  # 4.5 groups: the last one is ragged
    assert n_groups(576, -1) == 1
    assert n_groups(100, 32) == 4
    assert n_groups(64, 128) == 1
    assert n_groups(576, 576) == 1  # effective per-channel size, as the pipeline passes it


def test_expand_groups_ragged():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    e = expand_groups(t, 10, 4)
    assert e.shape == (2, 10)
    assert e[0].tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert e[1, -1] == 6
    assert expand_groups(t[:, :1], 7, -1).tolist() == [[1.0] * 7, [4.0] * 7]
    with pytest.raises(ValueError):
        expand_groups(t, 10, 8)  # 2 groups expected, 3 given


def _params(out, inp, gs, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    ng = n_groups(inp, gs)
    scale = torch.rand(out, ng, generator=g) * 0.5 + 0.05
    zero = torch.rand(out, ng, generator=g) * ((1 << bits) - 1)  # float zero-points
    return W, scale, zero


@pytest.mark.parametrize("bits,gs,inp", [(2, 32, 100), (3, 64, 576), (4, 128, 576), (8, -1, 576), (4, 576, 576)])
def test_quantize_dequantize_round_trip(bits, gs, inp):
    W, scale, zero = _params(6, inp, gs, bits)
    codes = quantize_codes(W, scale, zero, bits, gs)
    assert codes.dtype == torch.uint8 and codes.shape == W.shape
    assert int(codes.max()) <= (1 << bits) - 1
    deq = dequantize(codes, scale, zero, gs)
    assert deq.dtype == torch.float32 and deq.shape == W.shape
    # reference: explicit per-column loop over the (ragged) groups
    eff = inp if gs == -1 else gs
    for j in range(inp):
        s, z = scale[:, j // eff], zero[:, j // eff]
        q = torch.clamp(torch.round(W[:, j] / s + z), 0, (1 << bits) - 1)
        assert torch.equal(codes[:, j], q.to(torch.uint8))
        torch.testing.assert_close(deq[:, j], s * (q - z))
        torch.testing.assert_close(quantize_column(W[:, j], s, z, bits), s * (q - z))
    # quantizing the dequantized weights gives the same codes back
    assert torch.equal(quantize_codes(deq, scale, zero, bits, gs), codes)
    # unclipped elements are within half a step
    inside = (codes > 0) & (codes < (1 << bits) - 1)
    step = expand_groups(scale, inp, gs)
    assert torch.all((W - deq).abs()[inside] <= step[inside] * 0.5 + 1e-6)


def test_half_to_even_rounding():
    W = torch.tensor([[0.5, 1.5, 2.5, -0.5]])
    codes = quantize_codes(W, torch.ones(1, 1), torch.zeros(1, 1), 2, 4)
    assert codes.tolist() == [[0, 2, 2, 0]]
