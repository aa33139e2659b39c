"""Master linear -> Q4_1 / Q5_1 blocks, exactly (up to fp16 rounding of d and m); -> Q8_0 / Q4_0 / Q5_0 blocks
exactly when the master's zero-points allow it (pack_symmetric_exact).

A Q4_1/Q5_1 block is 32 consecutive input columns of one row with its own (d, m): w = d*q + m.
The master stores w = s*(q - Z) per group of G columns, so a block that lies inside one group
holds the master's codes unchanged with d = s, m = -s*Z. That needs G % 32 == 0 (group sizes
32/64/128/..., per-channel with in % 32 == 0; a ragged last group starts at a multiple of G and so
of 32) and in % 32 == 0. Only d and m are rounded to fp16; m absorbs the rounding of d in the
diag(H)-weighted least-squares sense: with a = fp16(s) - s, the best offset is
m = -s*Z - a * (Σ h q / Σ h) over the block's codes, then rounded to fp16.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .packers import QK

F16_MAX = 65504.0


class NotRepresentable(Exception):
    """The master's parameters cannot be stored in the block layout (message says why)."""


@dataclass
class PackedTensor:
    data: np.ndarray  # uint8 (rows, row_bytes) or float array
    qtype: str  # GGML type name
    exact: bool
    added_error: float  # Σ h (w_master - w_file)^2
    rel_error: float  # added_error / Σ h w_master^2
    note: str = ""


def block_params(scale: np.ndarray, zero: np.ndarray, group_size: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-32-block (s, Z) float64 (rows, n_in/32) from per-group (rows, n_groups); NotRepresentable if a block straddles groups."""
    if n_in % QK:
        raise NotRepresentable(f"input dim {n_in} is not a multiple of {QK}")
    if group_size % QK:
        raise NotRepresentable(f"group size {group_size} is not a multiple of {QK}")
    gidx = (np.arange(n_in // QK) * QK) // group_size
    return np.asarray(scale, np.float64)[:, gidx], np.asarray(zero, np.float64)[:, gidx]


def weighted_sums(w_ref: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(Σ h (w_ref - w_new)^2, Σ h w_ref^2), h broadcast over rows."""
    w_ref = np.asarray(w_ref, np.float64)
    diff = w_ref - np.asarray(w_new, np.float64)
    return float((diff * diff * h).sum()), float((w_ref * w_ref * h).sum())


def weighted_error(w_ref: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(Σ h (w_ref - w_new)^2, that / Σ h w_ref^2), h broadcast over rows."""
    err, ref = weighted_sums(w_ref, w_new, h)
    return err, (err / ref if ref > 0 else 0.0)


def master_dequant(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int) -> np.ndarray:
    """float64 (rows, in): s*(q - Z) per group (ragged last group allowed)."""
    n_in = codes.shape[1]
    gidx = np.arange(n_in) // group_size
    return np.asarray(scale, np.float64)[:, gidx] * (codes.astype(np.float64) - np.asarray(zero, np.float64)[:, gidx])


def pack_exact(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int, bits: int,
               hdiag: np.ndarray | None, gtype) -> PackedTensor:
    """Pack a master linear (codes uint8 (out, in), scale/zero (out, n_groups)) as Q4_1 or Q5_1 (gtype: its row in
    types.py)."""
    qtype, type_bits = gtype.name, gtype.bits
    if bits > type_bits:
        raise NotRepresentable(f"{bits}-bit codes do not fit {qtype} ({type_bits}-bit)")
    codes = np.asarray(codes, np.uint8)
    rows, n_in = codes.shape
    s, z = block_params(scale, zero, group_size, n_in)
    with np.errstate(over="ignore"):
        d16 = s.astype(np.float16)
    if not np.isfinite(d16).all():
        raise NotRepresentable(f"a scale exceeds the fp16 range ({F16_MAX})")
    h = np.ones(n_in) if hdiag is None else np.asarray(hdiag, np.float64)
    hb = np.broadcast_to(h.reshape(1, n_in // QK, QK), (rows, n_in // QK, QK))
    qb = codes.reshape(rows, n_in // QK, QK).astype(np.float64)
    hsum = hb.sum(-1)
    qbar = np.where(hsum > 0, (hb * qb).sum(-1) / np.where(hsum > 0, hsum, 1), qb.mean(-1))
    m_target = -s * z - (d16.astype(np.float64) - s) * qbar
    with np.errstate(over="ignore", invalid="ignore"):
        m16 = m_target.astype(np.float16)
    if not np.isfinite(m16).all():
        raise NotRepresentable(f"a min (-scale*zero) exceeds the fp16 range ({F16_MAX})")
    data = gtype.pack((d16, m16), codes)
    w_ref = master_dequant(codes, scale, zero, group_size)
    # what the runtime computes: fp16 -> fp32 d, m; d*q + m in fp32
    w_new = (np.repeat(d16.astype(np.float32), QK, 1) * codes.astype(np.float32)) + np.repeat(m16.astype(np.float32), QK, 1)
    err, rel = weighted_error(w_ref, w_new, h)
    return PackedTensor(data, qtype, True, err, rel, "codes exact; fp16 d, m")


def pack_symmetric_exact(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, group_size: int, bits: int,
                         hdiag: np.ndarray | None, gtype) -> PackedTensor:
    """Pack a master linear as a symmetric type w = d * kv[v] with kv consecutive integers (Q8_0: -128..127, Q4_0:
    -8..7, Q5_0: -16..15; gtype: its row in types.py), the master's codes unchanged: v = q - Z - kv[0].

    That holds the master's w = s*(q - Z) exactly (d = fp16(s), the nearest fp16 and so the best d for the fixed
    codes) when every 32-block lies inside one group, every zero-point Z is an integer and every block's codes
    stay in the type's range after the shift (a 4-bit master with integer Z always fits Q5_0 and Q8_0; Q4_0
    needs Z = 8, the midpoint). NotRepresentable (naming the first reason) otherwise: the caller refits."""
    kv = np.asarray(gtype.kv)
    if len(kv) < 2 or np.any(np.diff(kv) != 1):
        raise NotRepresentable(f"{gtype.name}'s values are not uniform: no master grid maps onto them")
    codes = np.asarray(codes, np.uint8)
    rows, n_in = codes.shape
    s, z = block_params(scale, zero, group_size, n_in)
    if np.any(z != np.rint(z)):
        raise NotRepresentable(f"a zero-point is not an integer ({gtype.name} is symmetric: w = d*(q - {int(-kv[0])}))")
    qb = codes.reshape(rows, n_in // QK, QK).astype(np.int64)
    v = qb - z.astype(np.int64)[..., None] - int(kv[0])  # (rows, blocks, 32) indices into kv
    if v.min(initial=0) < 0 or v.max(initial=0) >= len(kv):
        raise NotRepresentable(f"the codes minus their zero-point leave {gtype.name}'s range {int(kv[0])}..{int(kv[-1])}"
                               + (f" (the zero-point must be the midpoint {int(-kv[0])})" if bits == gtype.bits else ""))
    with np.errstate(over="ignore"):
        d16 = s.astype(np.float16)
    if not np.isfinite(d16).all():
        raise NotRepresentable(f"a scale exceeds the fp16 range ({F16_MAX})")
    v = v.reshape(rows, n_in).astype(np.uint8)
    data = gtype.pack((d16,), v)
    h = np.ones(n_in) if hdiag is None else np.asarray(hdiag, np.float64)
    w_new = np.repeat(d16.astype(np.float32), QK, 1) * kv.astype(np.float32)[v]  # what the runtime computes
    err, rel = weighted_error(master_dequant(codes, scale, zero, group_size), w_new, h)
    return PackedTensor(data, gtype.name, True, err, rel, "codes exact (integer zero-points); fp16 d")
