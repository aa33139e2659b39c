"""Rotary position embeddings as ONNX nodes, with the inverse frequencies transformers computes per rope type.

A layer's rope settings (`LayerAttention.rope` of the family: rope_theta, rope_type and its fields) and the
config give a `RopeSpec`: the rotated width (partial_rotary_factor x head_dim), inv_freq in float32, and the
attention scaling of cos/sin. LongRoPE keeps two tables (short and long factors) and picks one per forward
from max(position_ids) + 1 > original_max_position_embeddings, as transformers' dynamic update does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from neuqi_export.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class RopeSpec:
    """What one layer's rotary embedding needs: the rotated width, inv_freq (long/switch for LongRoPE), scaling."""

    dim: int
    inv_freq: tuple  # float32 values, dim/2
    scaling: float = 1.0
    long_inv_freq: tuple | None = None  # LongRoPE: used when max(position_ids) + 1 > switch
    switch: int | None = None


def _base_inv(base: float, dim: int):
    import torch

    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _llama3(inv, p: dict):
    import torch

    factor = float(p["factor"])
    lo, hi = float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    low_wl, high_wl = old / lo, old / hi
    wavelen = 2 * math.pi / inv
    inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
    is_medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
    return torch.where(is_medium, smoothed, inv_l)


def _original_max(cfg: dict, p: dict) -> int:
    """The pre-training context length: the top-level config field first (where some families keep it), then
    rope_parameters, then max_position_embeddings, as transformers does."""
    return int(cfg.get("original_max_position_embeddings") or p.get("original_max_position_embeddings")
               or cfg["max_position_embeddings"])


def _yarn(cfg: dict, p: dict, base: float, dim: int) -> RopeSpec:
    import torch

    orig = _original_max(cfg, p)
    factor = p.get("factor") or float(cfg["max_position_embeddings"]) / orig

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    scaling = p.get("attention_factor")
    if scaling is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        scaling = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    lo, hi = corr_dim(fast), corr_dim(slow)
    if p.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return RopeSpec(dim, tuple(inv.to(torch.float32).tolist()), float(scaling))


def _longrope(cfg: dict, p: dict, base: float, dim: int) -> RopeSpec:
    import torch

    orig = _original_max(cfg, p)
    factor = p.get("factor") or float(cfg["max_position_embeddings"]) / orig
    scaling = p.get("attention_factor")
    if scaling is None:
        scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    tables = []
    for key in ("short_factor", "long_factor"):
        ext = torch.tensor(p[key], dtype=torch.float32)
        if ext.numel() != dim // 2:
            raise UserError(f"rope {key} has {ext.numel()} entries, the rotary width {dim} needs {dim // 2}; "
                            "the config is broken")
        tables.append(tuple((1.0 / (ext * base ** shape)).to(torch.float32).tolist()))
    return RopeSpec(dim, tables[0], float(scaling), tables[1], int(orig))


def rope_spec(cfg: dict, rope: dict, head_dim: int) -> RopeSpec:
    """The RopeSpec of one layer's rope settings; UserError for a rope type the exporter cannot express."""
    partial = float(rope.get("partial_rotary_factor") or cfg.get("partial_rotary_factor") or 1.0)
    dim = int(head_dim * partial)
    if dim % 2 or not 0 < dim <= head_dim:
        raise UserError(f"partial_rotary_factor={partial} gives a rotary width of {dim} for head_dim {head_dim}; "
                        "the config is broken")
    base = float(rope["rope_theta"])
    rtype = rope["rope_type"]
    if rtype in ("longrope", "yarn"):
        return (_longrope if rtype == "longrope" else _yarn)(cfg, rope, base, dim)
    inv = _base_inv(base, dim)
    if rtype == "linear":
        inv = inv / float(rope["factor"])
    elif rtype == "llama3":
        inv = _llama3(inv, rope)
    elif rtype != "default":
        raise UserError(f"rope_type '{rtype}' is not supported by the ONNX exporter ({', '.join(ROPE_TYPES)} are); "
                        "export this model to another format")
    return RopeSpec(dim, tuple(inv.to(float).numpy().astype(np.float32).tolist()))


def cos_sin(b, spec: RopeSpec, name: str) -> tuple[str, str]:
    """cos, sin tables (batch, 1, seq, dim) in the graph dtype for `position_ids`, as transformers computes them."""
    pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], f"{name}/pos_f", to=TensorProto.FLOAT), b.i64(-1)],
               f"{name}/pos_u")
    inv = b.const(np.asarray(spec.inv_freq, np.float32), np.float32)
    if spec.long_inv_freq is not None:
        longest = b.op("Add", [b.op("ReduceMax", ["position_ids"], f"{name}/max_pos", keepdims=0),
                               b.const(1, np.int64)], f"{name}/seq_len")
        use_long = b.op("Greater", [longest, b.const(spec.switch, np.int64)], f"{name}/use_long")
        inv = b.op("Where", [use_long, b.const(np.asarray(spec.long_inv_freq, np.float32), np.float32), inv],
                   f"{name}/inv_freq")
    ang = b.op("Mul", [pos, inv], f"{name}/angles")
    ang = b.op("Concat", [ang, ang], f"{name}/cat", axis=-1)
    cos, sin = b.op("Cos", [ang], f"{name}/cos"), b.op("Sin", [ang], f"{name}/sin")
    if spec.scaling != 1.0:
        cos = b.op("Mul", [cos, b.const(spec.scaling, np.float32)], f"{name}/cos_s")
        sin = b.op("Mul", [sin, b.const(spec.scaling, np.float32)], f"{name}/sin_s")
    cos, sin = b.to_model(cos, f"{name}/cos"), b.to_model(sin, f"{name}/sin")
    return (b.op("Unsqueeze", [cos, b.i64(1)], f"{name}/cos_u"), b.op("Unsqueeze", [sin, b.i64(1)], f"{name}/sin_u"))


def rotate(b, x: str, cos: str, sin: str, head_dim: int, dim: int, name: str) -> str:
    """x (batch, heads, seq, head_dim) with its first `dim` channels rotated: x*cos + rotate_half(x)*sin."""
    rest = None
    if dim < head_dim:
        x, rest = b.op("Split", [x, b.i64(dim, head_dim - dim)], f"{name}/split_rot", n_out=2, axis=-1)
    half = dim // 2
    x1, x2 = b.op("Split", [x, b.i64(half, half)], f"{name}/split", n_out=2, axis=-1)
    rot = b.op("Concat", [b.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate_half", axis=-1)
    y = b.op("Add", [b.op("Mul", [x, cos], f"{name}/mul_cos"), b.op("Mul", [rot, sin], f"{name}/mul_sin")],
             f"{name}/rope")
    return y if rest is None else b.op("Concat", [y, rest], f"{name}/cat_pass", axis=-1)
