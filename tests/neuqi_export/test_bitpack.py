import numpy as np
import pytest

from neuqi_export.bitpack import pack_bits, packed_row_bytes, unpack_bits


def _reference_pack(codes, bits):
    """Bit-by-bit reference: code j of a row at stream bit j*bits, LSB first."""
    out = np.zeros((codes.shape[0], packed_row_bytes(codes.shape[1], bits)), np.uint8)
    for r in range(codes.shape[0]):
        for j, c in enumerate(codes[r]):
            for b in range(bits):
                pos = j * bits + b
                out[r, pos // 8] |= ((int(c) >> b) & 1) << (pos % 8)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 64, 131])
def test_pack_matches_bitwise_reference_and_roundtrips(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, size=(3, n), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert np.array_equal(packed, _reference_pack(codes, bits))
    assert np.array_equal(unpack_bits(packed, bits, n), codes)


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([[4]], np.uint8), 2)
