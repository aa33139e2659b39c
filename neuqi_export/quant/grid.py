"""Small shared helpers for the per-group uniform grid (NEUQI.md notation).

A weight `W` (out, in) is split along the input dimension into groups of `group_size` consecutive
columns (`group_size = -1`: one group per row). Every (row, group) has a scale `s > 0` and a float
zero-point `Z`; `q = clamp(round(w / s + Z), 0, 2**bits - 1)`, `ŵ = s * (q - Z)`. Parameters are stored as
(out, n_groups) tensors. The last group of a row may be shorter (in_features not a multiple of the
group size). Rounding is `torch.round` (half to even) everywhere.

These helpers accept any positive group size (the effective size, e.g. `in_features` for per-channel)
or -1; the stricter power-of-two check lives in `init_params`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _effective(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return max(int(in_features), 1)
    if int(group_size) <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return int(group_size)


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups per row: ceil(in_features / group_size) (1 for group_size = -1)."""
    gs = _effective(in_features, group_size)
    return -(-int(in_features) // gs)


def expand_groups(t: Tensor, in_features: int, group_size: int) -> Tensor:
    """(out, n_groups) per-group values -> (out, in_features), each column getting its group's value."""
    gs = _effective(in_features, group_size)
    ng = n_groups(in_features, group_size)
    if t.shape[-1] != ng:
        raise ValueError(f"expected {ng} groups in the last dimension, got {t.shape[-1]}")
    return t.repeat_interleave(gs, dim=-1)[..., :in_features]


def quantize_codes(weight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int) -> Tensor:
    """uint8 codes (out, in): clamp(round(w / s + Z), 0, 2**bits - 1), computed in float32."""
    w = weight.to(torch.float32)
    inf = w.shape[-1]
    s = expand_groups(scale.to(w.device, torch.float32), inf, group_size)
    z = expand_groups(zero.to(w.device, torch.float32), inf, group_size)
    q = torch.clamp(torch.round(w / s + z), 0, (1 << bits) - 1)
    return q.to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """float32 (out, in): s * (q - Z) with each column's group parameters."""
    q = codes.to(torch.float32)
    inf = q.shape[-1]
    s = expand_groups(scale.to(q.device, torch.float32), inf, group_size)
    z = expand_groups(zero.to(q.device, torch.float32), inf, group_size)
    return s * (q - z)


def quantize_column(w_col: Tensor, scale_col: Tensor, zero_col: Tensor, bits: int) -> Tensor:
    """GPTQ helper: one column (out,) with its group's (out,) scale and zero -> dequantized (out,) float32."""
    w = w_col.to(torch.float32)
    s = scale_col.to(w.device, torch.float32)
    z = zero_col.to(w.device, torch.float32)
    q = torch.clamp(torch.round(w / s + z), 0, (1 << bits) - 1)
    return s * (q - z)
