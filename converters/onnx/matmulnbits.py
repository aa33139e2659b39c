"""Packing one master QuantizedLinear into the inputs of `com.microsoft::MatMulNBits`.

The op (onnxruntime contrib, domain com.microsoft, version 1) computes `Y = A @ dequant(B)ᵀ` with
attributes K (in), N (out), bits (2/4/8 on CPU), block_size (power of two >= 16) and inputs

- B: uint8 (N, k_blocks, blob_size), k_blocks = ceil(K / block_size), blob_size = block_size*bits/8;
  the codes of each block packed low-first (4-bit: code 2i in the low nibble, 2i+1 in the high one;
  2-bit: four codes per byte from bit 0 up). That is exactly a little-endian bit stream of the
  padded row, so `neuqi_export.bitpack.pack_bits` does it (blocks are byte aligned).
- scales: (N, k_blocks), the dtype of A.
- zero_points: either uint8 (N, ceil(k_blocks*bits/8)) packed like B, or (N, k_blocks) in A's dtype.
- dequant = (code - zero_point) * scale per block.

Mapping the master onto it:
- block_size: the largest power of two >= 16 that divides the master group size (capped at 256), so
  every block lies inside one master group and the group's (scale, zero) are repeated for each of its
  blocks (exact). Per-channel masters use min(128, next power of two of K). A ragged last group
  (K not a multiple of the group size) is a ragged last block: k_blocks = ceil(K/block_size) and the
  codes past K are zero; onnxruntime reads only K columns of A, so they never contribute (tested).
- 3-bit codes sit unchanged in a 4-bit container (bits=4). 2-, 4-, 8-bit codes as they are.
- Zero points, two forms:
  * "fast" (default): uint8 zero points R = clamp(round(Z), 0, 2^bits-1) (onnxruntime's fast
    kernels), plus an exact correction, since s(q - Z) = s(q - R) + s(R - Z):
        y = MatMulNBits(x; R) + groupsum(x) @ D,   D[g, n] = s[n, g] * (R[n, g] - Z[n, g])
    groupsum(x)[g] = sum of x over the columns of master group g (a fixed 0/1 (K, n_groups) matrix).
  * "float": float zero points Z in A's dtype (exact in one op, but onnxruntime's CPU kernel takes a
    slow path for it, and refuses it at 8 bits: 8-bit masters always use the fast form).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neuqi_export.bitpack import pack_bits
from neuqi_export.errors import UserError

ZERO_POINT_MODES = ("fast", "float")


def _pow2_floor(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def choose_block_size(in_features: int, group_size: int) -> int:
    """MatMulNBits block_size for a master linear with this (effective) group size; UserError if none fits."""
    if group_size == -1 or group_size >= in_features:
        # one group per row: any block size gives the same result; ragged last block allowed
        return max(16, min(128, 1 << max(0, (int(in_features) - 1).bit_length())))
    g = int(group_size)
    low = g & -g  # largest power of two dividing g
    if low < 16:
        raise UserError(f"group size {g} cannot be expressed as MatMulNBits blocks (needs a power of two >= 16 dividing it); "
                        "re-quantize with --group-size 16/32/64/128 or -1")
    return min(low, 256)


@dataclass
class NBitsWeights:
    """Everything one MatMulNBits node (plus the optional correction) needs, as numpy arrays."""

    K: int
    N: int
    bits: int  # container bits written to the node (3-bit masters -> 4)
    master_bits: int
    block_size: int
    group_size: int  # effective master group size (K for per-channel)
    B: np.ndarray  # uint8 (N, k_blocks, blob)
    scales: np.ndarray  # float32 (N, k_blocks)
    zero_points: np.ndarray  # uint8 packed (N, ceil(kb*bits/8)) or float32 (N, k_blocks)
    correction: np.ndarray | None  # float32 (n_groups, N): D = s (R - Z); None for the float form
    zero_point_form: str  # "uint8+correction", "uint8" (integer zero points, no correction needed) or "float"

    @property
    def k_blocks(self) -> int:
        return self.B.shape[1]

    @property
    def n_groups(self) -> int:
        return -(-self.K // self.group_size)


def pack_codes(codes: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """uint8 codes (N, K) -> B uint8 (N, k_blocks, block_size*bits/8), zero codes past K."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    N, K = codes.shape
    kb = -(-K // block_size)
    if kb * block_size != K:
        padded = np.zeros((N, kb * block_size), dtype=np.uint8)
        padded[:, :K] = codes
        codes = padded
    return pack_bits(codes, bits).reshape(N, kb, block_size * bits // 8)


def pack_zero_points(zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 zero points (N, k_blocks) -> (N, ceil(k_blocks*bits/8)), packed like B."""
    return pack_bits(np.ascontiguousarray(zp, dtype=np.uint8), bits)


def group_sum_matrix(K: int, group_size: int, dtype=np.float32) -> np.ndarray:
    """0/1 (K, n_groups) matrix: x @ M = per-group sums of x."""
    ng = -(-K // group_size)
    m = np.zeros((K, ng), dtype=dtype)
    m[np.arange(K), np.arange(K) // group_size] = 1
    return m


def prepare(lin, zero_point: str = "fast", container_bits: int | None = None) -> NBitsWeights:
    """A master QuantizedLinear -> NBitsWeights (float32 parameters; the graph casts to fp16 if asked).
    container_bits: store the codes in a wider container than the default (2/4/8 as they are, 3 in 4)."""
    if zero_point not in ZERO_POINT_MODES:
        raise UserError(f"zero-point form '{zero_point}' is unknown; use one of {', '.join(ZERO_POINT_MODES)}")
    codes = lin.codes.cpu().numpy().astype(np.uint8)
    N, K = codes.shape
    mbits = int(lin.bits)
    if mbits not in (2, 3, 4, 8):
        raise UserError(f"{mbits}-bit codes have no MatMulNBits container; re-quantize with --bits 2, 3, 4 or 8")
    bits = container_bits or (4 if mbits == 3 else mbits)
    if bits < mbits or bits not in (2, 4, 8):
        raise ValueError(f"no {bits}-bit container for {mbits}-bit codes")
    G = K if lin.group_size == -1 else min(int(lin.group_size), K)
    bs = choose_block_size(K, -1 if G == K else G)
    kb = -(-K // bs)
    block_group = (np.arange(kb) * bs) // G  # master group of every block
    scale = lin.scale.detach().cpu().numpy().astype(np.float32)
    zero = lin.zero.detach().cpu().numpy().astype(np.float32)
    B = pack_codes(codes, bits, bs)
    scales = np.ascontiguousarray(scale[:, block_group])
    if zero_point == "float" and bits != 8:
        return NBitsWeights(K, N, bits, mbits, bs, G, B, scales, np.ascontiguousarray(zero[:, block_group]), None, "float")
    R = np.clip(np.round(zero), 0, (1 << bits) - 1)
    D = (scale.astype(np.float64) * (R.astype(np.float64) - zero.astype(np.float64))).T.astype(np.float32)
    zp = pack_zero_points(R[:, block_group].astype(np.uint8), bits)
    if not np.any(D):  # integer zero points inside the code range (minmax / neuqi_int masters): no correction
        return NBitsWeights(K, N, bits, mbits, bs, G, B, scales, zp, None, "uint8")
    return NBitsWeights(K, N, bits, mbits, bs, G, B, scales, zp, np.ascontiguousarray(D), "uint8+correction")


def reference_matmul(x: np.ndarray, w: NBitsWeights) -> np.ndarray:
    """What the exported node(s) compute, in float64 numpy, from the packed arrays (for tests)."""
    from neuqi_export.bitpack import unpack_bits

    kb, bs = w.k_blocks, w.block_size
    q = unpack_bits(w.B.reshape(w.N, -1), w.bits, kb * bs).astype(np.float64).reshape(w.N, kb, bs)
    if w.zero_points.dtype == np.uint8:
        zp = unpack_bits(w.zero_points, w.bits, kb).astype(np.float64)
    else:
        zp = w.zero_points.astype(np.float64)
    deq = ((q - zp[:, :, None]) * w.scales.astype(np.float64)[:, :, None]).reshape(w.N, kb * bs)[:, :w.K]
    y = x.astype(np.float64) @ deq.T
    if w.correction is not None:
        y = y + (x.astype(np.float64) @ group_sum_matrix(w.K, w.group_size, np.float64)) @ w.correction.astype(np.float64)
    return y


def without_arrays(w: NBitsWeights) -> NBitsWeights:
    """`w` with its arrays replaced by read-only views of one zero of the same shape and dtype (no memory): what a
    streamed export keeps of a linear once its initializers are written (shapes and forms for the report)."""
    from dataclasses import replace

    def shell(a):
        return None if a is None else np.broadcast_to(np.zeros((), a.dtype), a.shape)

    return replace(w, B=shell(w.B), scales=shell(w.scales), zero_points=shell(w.zero_points),
                   correction=shell(w.correction))
