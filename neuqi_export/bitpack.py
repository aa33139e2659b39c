"""Little-endian bit-stream packing of integer codes along the last axis (vectorised numpy).

Code j of a row occupies bits [j*bits, (j+1)*bits) of the row's stream, least significant bit
first; the stream is cut into bytes, byte 0 holding stream bits 0..7. Rows are padded with zero
bits to a whole byte. Written by hand: no maintained library packs arbitrary widths this way.
"""
from __future__ import annotations

import numpy as np


def packed_row_bytes(n_codes: int, bits: int) -> int:
    """Bytes one packed row of `n_codes` codes of `bits` bits takes."""
    return (n_codes * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (..., n) with values < 2**bits into uint8 (..., packed_row_bytes(n, bits))."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    *lead, n = codes.shape
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., n, bits)
    stream = planes.reshape(*lead, n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n_codes: int) -> np.ndarray:
    """Inverse of pack_bits: uint8 (..., nbytes) -> uint8 codes (..., n_codes)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    *lead, _ = packed.shape
    stream = np.unpackbits(packed, axis=-1, bitorder="little")[..., : n_codes * bits]
    planes = stream.reshape(*lead, n_codes, bits).astype(np.uint8)
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint8)
    return (planes * weights).sum(axis=-1, dtype=np.uint16).astype(np.uint8)
