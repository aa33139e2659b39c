"""Grids a linear can be quantized on besides the pipeline's own uniform b-bit grid, registered by kind.

The quantizer knows no converter: a package that defines other grids (converters.gguf: one per GGUF block type,
the K-quant-aware mode) registers a maker here when it is imported, and the pipeline asks for "the grid of this
linear" by kind and name. The CLI imports the converters, so their grids are there whenever a command runs.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .errors import UserError


class LinearGrid(Protocol):
    """Quantizes one linear on a fixed grid family: returns (the master record, the dequantized weights)."""

    def quantize(self, W: torch.Tensor, H: torch.Tensor | None, hdiag: torch.Tensor, *, gptq: bool, act_order: bool,
                 timer, factor) -> tuple[object, torch.Tensor]: ...


_MAKERS: dict[str, Callable[[str], LinearGrid]] = {}


def register(kind: str, make: Callable[[str], LinearGrid]) -> None:
    """Make `kind`'s grids available: make(name) -> the grid called `name` (e.g. kind 'gguf', name 'Q4_K')."""
    _MAKERS[kind] = make


def grid(kind: str, name: str) -> LinearGrid:
    """The registered grid `name` of `kind`; UserError when no package registered that kind."""
    if kind not in _MAKERS:
        raise UserError(f"no {kind} grids are registered (they come with converters.{kind}); run through the "
                        f"neuqi-export command, or import converters.{kind} before quantizing")
    return _MAKERS[kind](name)
