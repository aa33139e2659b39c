"""The grids a linear can be quantized on, registered by kind; the pipeline asks for "the grid of this linear".

Kind "uniform" (UniformGrid: b-bit codes, a float scale and zero-point per group of input columns, fitted by
quant.params, GPTQ'd by gptq.py) is the quantizer's own and registered here. The quantizer knows no converter: a
package that defines other grids (converters.gguf: one per GGUF block type, the K-quant-aware mode) registers a
maker when it is imported. The CLI imports the converters, so their grids are there whenever a command runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .errors import UserError
from .gptq import gptq_quantize
from .master import QuantizedLinear
from .quant.grid import dequantize, quantize_codes
from .quant.params import init_params


class LinearGrid(Protocol):
    """Quantizes one linear on a fixed grid family: returns (the master record, the dequantized weights)."""

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None, hdiag: torch.Tensor, *, gptq: bool, act_order: bool,
                 timer, factor) -> tuple[object, torch.Tensor]:
        """W (out, in) float32; H the damped Hessian (in, in) or None; hdiag (in,) the weights of the diag(H)
        objective (ones without H or importance); GPTQ when gptq (and H); factor: GPTQFactor.of(H) or None."""
        ...


_MAKERS: dict[str, Callable[..., LinearGrid]] = {}


def register(kind: str, make: Callable[..., LinearGrid]) -> None:
    """Make `kind`'s grids available: make(*spec) -> that grid (e.g. kind 'gguf', spec ('Q4_K',))."""
    _MAKERS[kind] = make


def grid(kind: str, *spec, **named) -> LinearGrid:
    """The registered grid of `kind` that `spec` names; UserError when no package registered that kind."""
    if kind not in _MAKERS:
        raise UserError(f"no {kind} grids are registered (they come with converters.{kind}); run through the "
                        f"neuqi-export command, or import converters.{kind} before quantizing")
    return _MAKERS[kind](*spec, **named)


@dataclass(frozen=True)
class UniformGrid:
    """b-bit codes with a float scale and zero-point per group of `group_size` input columns (-1: per channel),
    fitted with quant.params' `init` on the original W; the master holds a QuantizedLinear."""

    bits: int
    group_size: int
    init: str

    def quantize(self, W, H, hdiag, *, gptq, act_order, timer, factor):
        with timer.stage("fit"):  # init_params weights by hdiag only where its method has an objective; ones = h ≡ 1
            scale, zero = init_params(W, self.bits, self.group_size, method=self.init, hdiag=hdiag)
        eff_gs = W.shape[1] if self.group_size == -1 else self.group_size
        if gptq:
            with timer.stage("gptq"):
                codes = gptq_quantize(W, H, scale, zero, self.bits, self.group_size, act_order=act_order,
                                      factor=factor)
        else:
            codes = quantize_codes(W, scale, zero, self.bits, eff_gs)
        deq = dequantize(codes, scale, zero, eff_gs)
        return QuantizedLinear(codes.cpu(), scale.float().cpu(), zero.float().cpu(), self.bits, self.group_size,
                               hdiag.cpu()), deq


register("uniform", UniformGrid)  # the pipeline's grid for every linear opts.gguf_types does not name
