"""The grid registry (neuqi_export/grids.py): the uniform grid registered as kind 'uniform', quantize_linear's one
path equal to the uniform formula computed directly from quant.params / quant.grid / gptq, a linear that
opts.gguf_types names sent to the 'gguf' kind's grid, and an unregistered kind refused in one line."""
import dataclasses

import pytest
import torch

from neuqi_export import grids
from neuqi_export.errors import UserError
from neuqi_export.gptq import gptq_quantize, weighted_error
from neuqi_export.master import GGUFLinear, QuantizedLinear
from neuqi_export.pipeline import QuantizeOptions, grid_of, quantize_linear
from neuqi_export.quant.grid import dequantize, quantize_codes
from neuqi_export.quant.params import init_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _w_h(out=12, inp=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g) * (1 + torch.rand(inp, generator=g))
    X = torch.randn(4 * inp, inp, generator=g)
    H = X.T @ X / X.shape[0]
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(inp)
    return W, H


def _reference(W, H, hdiag, opts: QuantizeOptions):
    """(codes, scale, zero, deq) of the uniform grid, straight from the fit / round / GPTQ functions."""
    scale, zero = init_params(W, opts.bits, opts.group_size, method=opts.init, hdiag=hdiag)
    gs = W.shape[1] if opts.group_size == -1 else opts.group_size
    codes = (gptq_quantize(W, H, scale, zero, opts.bits, opts.group_size, act_order=opts.act_order)
             if opts.gptq else quantize_codes(W, scale, zero, opts.bits, gs))
    return codes, scale, zero, dequantize(codes, scale, zero, gs)


def test_the_uniform_grid_is_registered_and_records_say_their_kind():
    g = grids.grid("uniform", 3, 64, "neuqi_int")
    assert isinstance(g, grids.UniformGrid) and (g.bits, g.group_size, g.init) == (3, 64, "neuqi_int")
    assert grid_of("model.layers.0.mlp.up_proj", QuantizeOptions(bits=2, group_size=-1, init="mse")) == \
        grids.UniformGrid(2, -1, "mse")
    assert (QuantizedLinear.kind, GGUFLinear.kind) == ("uniform", "gguf")
    assert "kind" not in {f.name for f in dataclasses.fields(QuantizedLinear)}  # a class fact: nothing stored


@pytest.mark.parametrize("init,bits,group_size,gptq,act_order", [
    ("neuqi", 4, 32, False, True), ("neuqi", 4, 32, True, True), ("neuqi_int", 3, -1, True, False),
    ("minmax", 2, 16, True, True), ("mse", 8, 64, False, True)])
def test_quantize_linear_is_the_uniform_formula(init, bits, group_size, gptq, act_order):
    W, H = _w_h()
    opts = QuantizeOptions(bits=bits, group_size=group_size, init=init, gptq=gptq, act_order=act_order)
    rec, losses, deq = quantize_linear(W, H, opts, "model.layers.0.self_attn.q_proj")
    hdiag = torch.diagonal(H).contiguous()
    codes, scale, zero, ref = _reference(W, H, hdiag if init in ("neuqi", "neuqi_int") else None, opts)
    assert isinstance(rec, QuantizedLinear) and (rec.bits, rec.group_size) == (bits, group_size)
    assert torch.equal(rec.codes, codes) and torch.equal(rec.scale, scale) and torch.equal(rec.zero, zero)
    assert torch.equal(deq, ref) and torch.equal(rec.dequantize(), ref) and torch.equal(rec.hdiag, hdiag)
    assert losses["diag"] == pytest.approx(float(((W.double() - ref.double()) ** 2 * hdiag.double()).sum()), rel=1e-12)
    assert losses["hessian"] == pytest.approx(weighted_error(W, ref, H), rel=1e-12)


def test_without_h_the_fit_is_unweighted_and_an_imatrix_is_damped_like_h():
    W, _ = _w_h(seed=1)
    opts = QuantizeOptions(bits=4, group_size=16, init="neuqi", calibrate=False)
    rec, losses, deq = quantize_linear(W, None, opts)
    codes, scale, zero, ref = _reference(W, None, None, opts)  # the grid's ones fit as init_params' h ≡ 1 (None)
    assert torch.equal(rec.codes, codes) and torch.equal(rec.scale, scale) and torch.equal(deq, ref)
    assert torch.equal(rec.hdiag, torch.ones(W.shape[1])) and losses["hessian"] == losses["diag"]
    h = torch.rand(W.shape[1], generator=torch.Generator().manual_seed(2)) * 5
    rec, losses, deq = quantize_linear(W, None, opts, importance=h)
    damped = h + opts.percdamp * h.mean()
    codes, scale, zero, ref = _reference(W, None, damped, opts)
    assert torch.equal(rec.codes, codes) and torch.equal(rec.zero, zero) and torch.equal(rec.hdiag, damped)
    assert losses["diag"] == pytest.approx(float(((W.double() - ref.double()) ** 2 * damped.double()).sum()), rel=1e-12)


def test_a_linear_gguf_types_names_goes_to_the_gguf_grid(monkeypatch):
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Halves:  # a stand-in 'gguf' grid: rounds every weight to a multiple of 0.5
        qtype: str

        def quantize(self, W, H, hdiag, *, gptq, act_order, timer, factor):
            seen.append((self.qtype, gptq))
            deq = torch.round(W * 2) / 2
            return GGUFLinear(deq.half(), "F16", tuple(W.shape), hdiag.cpu()), deq

    monkeypatch.setitem(grids._MAKERS, "gguf", Halves)
    W, H = _w_h(seed=3)
    opts = QuantizeOptions(gptq=True, group_size=32, gguf_types={"a": "Q4_K"})
    rec, losses, deq = quantize_linear(W, H, opts, "a")
    assert seen == [("Q4_K", True)] and isinstance(rec, GGUFLinear) and torch.equal(deq, torch.round(W * 2) / 2)
    assert losses["hessian"] == pytest.approx(weighted_error(W, deq, H), rel=1e-12)
    rec, _, _ = quantize_linear(W, H, opts, "b")  # not named: the uniform grid
    assert isinstance(rec, QuantizedLinear) and len(seen) == 1


def test_an_unregistered_kind_is_refused_in_one_line():
    with pytest.raises(UserError) as e:
        grids.grid("ternary", "T2")
    assert "no ternary grids are registered" in str(e.value) and "\n" not in str(e.value)


def test_gguf_records_read_their_blocks_through_the_registered_format(monkeypatch):
    from neuqi_export import master

    class Bytes:  # a stand-in block format: one byte per weight, weight = byte / 10
        @staticmethod
        def row_bytes(qtype, n):
            return n

        @staticmethod
        def dequantize(data, qtype):
            return data.astype("float32") / 10

    data = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    rec = GGUFLinear(data, "Q8_0", (3, 4))
    monkeypatch.delitem(master._BLOCKS, "gguf", raising=False)
    with pytest.raises(UserError) as e:
        rec.dequantize()
    assert "only converters.gguf reads" in str(e.value) and "\n" not in str(e.value)
    assert torch.equal(GGUFLinear(data.half(), "F16", (3, 4)).dequantize(), data.float())  # floats: no format asked
    monkeypatch.setitem(master._BLOCKS, "gguf", Bytes)
    rec.validate("x")
    assert torch.equal(rec.dequantize(), data.float() / 10)
    with pytest.raises(UserError, match="do not match"):
        GGUFLinear(data[:, :3], "Q8_0", (3, 4)).validate("x")
