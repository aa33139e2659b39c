"""GGUF block packers, written from the block layouts (vectorised numpy, no per-block Python loops).

Every function returns the raw bytes of a tensor as uint8 (rows, row_bytes); GGUFWriter turns that
back into the element shape with the block size of the type. The layouts, per block:

- Q4_1 (32 weights, 20 bytes): fp16 d, fp16 m, 16 bytes of nibbles; byte k holds weight k in its
  low nibble and weight k+16 in its high nibble. w = d*q + m, q in 0..15.
- Q5_1 (32 weights, 24 bytes): fp16 d, fp16 m, uint32 qh (bit i = 5th bit of weight i), then the low
  nibbles as in Q4_1. w = d*q + m, q in 0..31.
- Q8_0 (32 weights, 34 bytes): fp16 d, 32 int8. w = d*q.
- Q4_K (256 weights, 144 bytes): fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) for 8 sub-blocks
  of 32, 128 bytes of nibbles (32-byte chunk c: low nibbles = sub-block 2c, high = 2c+1).
  w = d*sc*q - dmin*mn.
- Q2_K (256 weights, 84 bytes): 16 bytes (low nibble scale, high nibble min) for 16 sub-blocks of
  16, 64 bytes of 2-bit codes, fp16 d, fp16 dmin. w = d*sc*q - dmin*mn.
- Q3_K (256 weights, 110 bytes): 32 bytes high-bit mask, 64 bytes of 2-bit low codes, 12 bytes of
  6-bit signed scales (offset 32), fp16 d. w = d*sc*(q-4), q in 0..7.
- Q6_K (256 weights, 210 bytes): 128 bytes low nibbles, 64 bytes high 2 bits, 16 int8 scales,
  fp16 d. w = d*sc*(q-32), q in 0..63.

Checked bit-exactly against gguf.quants.dequantize in tests/converters/test_gguf_packers.py.
"""
from __future__ import annotations

import numpy as np

QK = 32  # block of the legacy types
QK_K = 256  # super-block of the K types


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """(..., n) float16 -> (..., n, 2) uint8 (little-endian)."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _check_codes(q: np.ndarray, block: int, levels: int) -> np.ndarray:
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] % block:
        raise ValueError(f"codes must be (rows, k*{block}), got {q.shape}")
    if q.size and (int(q.min()) < 0 or int(q.max()) >= levels):
        raise ValueError(f"codes outside 0..{levels - 1}")
    return q.astype(np.uint8)


def pack_q4_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q uint8 (rows, in) in 0..15; d, m float16 (rows, in/32) -> uint8 (rows, in/32*20)."""
    q = _check_codes(q, QK, 16)
    rows, n = q.shape
    nb = n // QK
    qb = q.reshape(rows, nb, QK)
    qs = qb[..., :16] | (qb[..., 16:] << np.uint8(4))
    out = np.concatenate([_f16_bytes(d), _f16_bytes(m), qs], axis=-1)
    return out.reshape(rows, nb * 20)


def pack_q5_1(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """q uint8 (rows, in) in 0..31; d, m float16 (rows, in/32) -> uint8 (rows, in/32*24)."""
    q = _check_codes(q, QK, 32)
    rows, n = q.shape
    nb = n // QK
    qb = q.reshape(rows, nb, QK)
    qh = np.packbits((qb >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")  # (rows, nb, 4)
    lo = qb & np.uint8(0x0F)
    qs = lo[..., :16] | (lo[..., 16:] << np.uint8(4))
    out = np.concatenate([_f16_bytes(d), _f16_bytes(m), qh, qs], axis=-1)
    return out.reshape(rows, nb * 24)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q int8 (rows, in) in -127..127; d float16 (rows, in/32) -> uint8 (rows, in/32*34)."""
    q = np.asarray(q)
    rows, n = q.shape
    nb = n // QK
    qs = q.astype(np.int8).view(np.uint8).reshape(rows, nb, QK)
    return np.concatenate([_f16_bytes(d), qs], axis=-1).reshape(rows, nb * 34)


def _pack_2bit_k(q: np.ndarray) -> np.ndarray:
    """(rows, nsb, 256) values 0..3 -> (rows, nsb, 64): byte h*32+k, bits 2s = weight h*128 + s*32 + k."""
    rows, nsb, _ = q.shape
    q = q.reshape(rows, nsb, 2, 4, 32).astype(np.uint8)
    packed = q[:, :, :, 0] | (q[:, :, :, 1] << 2) | (q[:, :, :, 2] << 4) | (q[:, :, :, 3] << 6)
    return packed.reshape(rows, nsb, 64)


def pack_q4_k(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """q (rows, in) 0..15; sc, mn (rows, in/32) 0..63; d, dmin float16 (rows, in/256)."""
    q = _check_codes(q, QK_K, 16)
    rows, n = q.shape
    nsb = n // QK_K
    sc = sc.astype(np.uint8).reshape(rows, nsb, 8)
    mn = mn.astype(np.uint8).reshape(rows, nsb, 8)
    if sc.size and (sc.max() > 63 or mn.max() > 63):
        raise ValueError("Q4_K scales/mins must be 0..63")
    b0 = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    b1 = (mn[..., :4] & 0x3F) | ((mn[..., 4:] >> 4) << 6)
    b2 = (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)
    scales = np.concatenate([b0, b1, b2], axis=-1).astype(np.uint8)
    qb = q.reshape(rows, nsb, 4, 2, 32)
    qs = (qb[:, :, :, 0] | (qb[:, :, :, 1] << np.uint8(4))).reshape(rows, nsb, 128)
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, qs], axis=-1)
    return out.reshape(rows, nsb * 144)


def pack_q2_k(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """q (rows, in) 0..3; sc, mn (rows, in/16) 0..15; d, dmin float16 (rows, in/256)."""
    q = _check_codes(q, QK_K, 4)
    rows, n = q.shape
    nsb = n // QK_K
    sc = sc.astype(np.uint8).reshape(rows, nsb, 16)
    mn = mn.astype(np.uint8).reshape(rows, nsb, 16)
    if sc.size and (sc.max() > 15 or mn.max() > 15):
        raise ValueError("Q2_K scales/mins must be 0..15")
    scales = (sc | (mn << 4)).astype(np.uint8)
    qs = _pack_2bit_k(q.reshape(rows, nsb, QK_K))
    out = np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return out.reshape(rows, nsb * 84)


def pack_q3_k(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (rows, in) 0..7 (weight = d*sc*(q-4)); sc (rows, in/16) int in -32..31; d float16 (rows, in/256)."""
    q = _check_codes(q, QK_K, 8)
    rows, n = q.shape
    nsb = n // QK_K
    sc = np.asarray(sc).astype(np.int16).reshape(rows, nsb, 16)
    if sc.size and (sc.min() < -32 or sc.max() > 31):
        raise ValueError("Q3_K scales must be -32..31")
    u = (sc + 32).astype(np.uint8)  # 6-bit
    lo, hi = u & 0x0F, u >> 4
    lbytes = lo[..., :8] | (lo[..., 8:] << 4)  # byte b: scale b (low nibble), scale b+8 (high nibble)
    h = hi.reshape(rows, nsb, 4, 4)  # scale s*4+b -> bits 2s of byte 8+b
    hbytes = h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)
    scales = np.concatenate([lbytes, hbytes], axis=-1).astype(np.uint8)
    qb = q.reshape(rows, nsb, QK_K)
    qs = _pack_2bit_k(qb & np.uint8(3))
    hbit = (qb >> np.uint8(2)).reshape(rows, nsb, 8, 32)  # weight bit*32+k -> bit `bit` of hmask[k]
    hmask = np.zeros((rows, nsb, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= (hbit[:, :, bit] << np.uint8(bit)).astype(np.uint8)
    out = np.concatenate([hmask, qs, scales, _f16_bytes(d)], axis=-1)
    return out.reshape(rows, nsb * 110)


def pack_q6_k(q: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q (rows, in) 0..63 (weight = d*sc*(q-32)); sc (rows, in/16) int8; d float16 (rows, in/256)."""
    q = _check_codes(q, QK_K, 64)
    rows, n = q.shape
    nsb = n // QK_K
    qb = q.reshape(rows, nsb, 2, 2, 64)  # half h, 64-chunk j (nibble shift 4j), byte k
    lo = qb & np.uint8(0x0F)
    ql = (lo[:, :, :, 0] | (lo[:, :, :, 1] << np.uint8(4))).reshape(rows, nsb, 128)
    hi = (q.reshape(rows, nsb, 2, 4, 32) >> np.uint8(4))  # half h, 32-chunk s (shift 2s), byte k
    qh = (hi[:, :, :, 0] | (hi[:, :, :, 1] << 2) | (hi[:, :, :, 2] << 4) | (hi[:, :, :, 3] << 6)).reshape(rows, nsb, 64)
    scales = np.asarray(sc).astype(np.int8).view(np.uint8).reshape(rows, nsb, 16)
    out = np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), scales, _f16_bytes(d)], axis=-1)
    return out.reshape(rows, nsb * 210)


# ----------------------------------------------------------------------------------------------
# float tensors (embeddings, output head): quantized here from float weights


def _round_half_away(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def fit_q8_0_params(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d float16 (rows, in/32), q int8 (rows, in)): round-to-nearest with d = max|w|/127 per block (the reference rule)."""
    w = np.asarray(w, dtype=np.float32)
    rows, n = w.shape
    wb = w.reshape(rows, n // QK, QK)
    d = np.abs(wb).max(axis=-1) / 127
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d)).astype(np.float32)
    q = np.clip(_round_half_away(wb * inv[..., None]), -127, 127).astype(np.int8)
    return d.astype(np.float16), q.reshape(rows, n)


def quantize_q8_0(w: np.ndarray) -> np.ndarray:
    """float (rows, in) -> Q8_0 bytes (fit_q8_0_params, packed)."""
    d, q = fit_q8_0_params(w)
    return pack_q8_0(q, d)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """float (rows, in) -> Q6_K bytes (in % 256 == 0), see fit_q6_k_params."""
    sc, d16, q = fit_q6_k_params(w)
    return pack_q6_k(q, sc, d16)


def fit_q6_k_params(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q6_K (sc int8 (rows, in/16), d float16 (rows, in/256), q uint8 0..63 (rows, in)) for float w, in % 256 == 0.

    Per 16-weight sub-block a scale is searched on a small grid around max|w|/32 (least squares
    over the codes at each candidate); the 16 scales of a super-block are then put on the int8
    lattice d*sc, and the codes re-rounded with the final d*sc.
    """
    w = np.asarray(w, dtype=np.float32)
    rows, n = w.shape
    nsb = n // QK_K
    x = w.reshape(rows, nsb, 16, 16).astype(np.float64)
    amax_i = np.abs(x).argmax(axis=-1)
    vmax = np.take_along_axis(x, amax_i[..., None], axis=-1)[..., 0]  # signed value of largest magnitude
    best_s = np.zeros(x.shape[:-1])
    best_err = np.full(x.shape[:-1], np.inf)
    for f in np.linspace(-0.9, 0.9, 19):  # candidate: map vmax to -32 - f (like the reference's search)
        iscale = np.where(vmax == 0, 0.0, -(32 + f) / np.where(vmax == 0, 1, vmax))
        qc = np.clip(np.round(x * iscale[..., None]), -32, 31)
        sumlx = (x * qc).sum(-1)
        suml2 = (qc * qc).sum(-1)
        s = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0.0)
        err = ((x - s[..., None] * qc) ** 2).sum(-1)
        better = err < best_err
        best_s = np.where(better, s, best_s)
        best_err = np.where(better, err, best_err)
    # super-block scale: the largest |sub-scale| maps to -128 (or 127) of int8
    smax_i = np.abs(best_s).argmax(axis=-1)
    smax = np.take_along_axis(best_s, smax_i[..., None], axis=-1)[..., 0]
    d = np.where(smax == 0, 0.0, smax / -128.0)
    d16 = d.astype(np.float16)
    df = d16.astype(np.float64)
    sc = np.clip(np.round(np.where(df[..., None] == 0, 0, best_s / np.where(df == 0, 1, df)[..., None])), -128, 127)
    eff = df[..., None] * sc  # (rows, nsb, 16)
    q = np.clip(np.round(np.where(eff[..., None] == 0, 0, x / np.where(eff == 0, 1, eff)[..., None])), -32, 31)
    q = (q + 32).astype(np.uint8).reshape(rows, n)
    return sc.astype(np.int8).reshape(rows, nsb * 16), d16, q


def pack_q5_k(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q5_K (256 weights, 176 bytes): fp16 d, fp16 dmin, 12 bytes 6-bit scales/mins (as Q4_K), 32 bytes qh
    (byte l, bit s = 5th bit of sub-block s's weight l), 128 bytes low nibbles (as Q4_K)."""
    q = np.asarray(q, np.uint8)
    rows, n = q.shape
    nsb = n // QK_K
    k4 = pack_q4_k(q & np.uint8(15), sc, mn, d, dmin).reshape(rows, nsb, 144)
    hi = (q.reshape(rows, nsb, 8, 32) >> np.uint8(4)) & np.uint8(1)
    qh = np.packbits(hi.transpose(0, 1, 3, 2), axis=-1, bitorder="little").reshape(rows, nsb, 32)
    return np.concatenate([k4[..., :16], qh, k4[..., 16:]], -1).reshape(rows, nsb * 176)
