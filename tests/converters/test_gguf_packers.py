"""GGUF block packers, checked bit-exactly against gguf.quants.dequantize (the reference reader)."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from converters.gguf import packers as P
from converters.gguf.exact import NotRepresentable, master_dequant, pack_exact
from converters.gguf.kquants import refit_legacy
from converters.gguf.types import TYPES
from converters.gguf.vocab import detect_pre
from converters.gguf.writer import rope_permutation

RNG = np.random.default_rng(0)


def _rep(x, k):
    return np.repeat(x.astype(np.float32), k, axis=1)


def _params(rows, n_in, g, bits, rng, kind="normal"):
    ng = -(-n_in // g)
    if kind == "huge":
        scale = 10 ** rng.uniform(-4, 3, (rows, ng))
    else:
        scale = rng.uniform(1e-3, 0.2, (rows, ng))
    zero = rng.normal(0, 6, (rows, ng))  # float, negative and beyond the code range
    scale[0, 0] = 0.0  # an all-zero group
    zero[0, 0] = 0.0
    codes = rng.integers(0, 2**bits, (rows, n_in)).astype(np.uint8)
    codes[1, :g] = 0  # a group of equal codes
    return codes, scale.astype(np.float32), zero.astype(np.float32)


def _block_dm(data, qtype):
    """Read back the fp16 (d, m) of every block from the packed bytes."""
    size = {"Q4_1": 20, "Q5_1": 24}[qtype]
    b = data.reshape(data.shape[0], -1, size)
    return (np.ascontiguousarray(b[..., 0:2]).view("<f2")[..., 0], np.ascontiguousarray(b[..., 2:4]).view("<f2")[..., 0])


@pytest.mark.parametrize("qtype,bits", [("Q4_1", 4), ("Q4_1", 2), ("Q4_1", 3), ("Q5_1", 5), ("Q5_1", 4)])
@pytest.mark.parametrize("n_in,g", [(256, 32), (256, 64), (256, 128), (160, 128), (192, -1), (96, 96)])
@pytest.mark.parametrize("kind", ["normal", "huge"])
def test_exact_pack_is_bit_exact_and_keeps_codes(qtype, bits, n_in, g, kind):
    rng = np.random.default_rng(hash((qtype, bits, n_in, g, kind)) % 2**32)
    rows = 6
    eff = n_in if g == -1 else g
    codes, scale, zero = _params(rows, n_in, eff, bits, rng, kind)
    hdiag = rng.uniform(0.1, 2.0, n_in)
    pt = pack_exact(codes, scale, zero, eff, bits, hdiag, TYPES[qtype])
    assert pt.exact and pt.qtype == qtype and pt.data.dtype == np.uint8
    d16, m16 = _block_dm(pt.data, qtype)
    expect = _rep(d16, 32) * codes.astype(np.float32) + _rep(m16, 32)
    got = dequantize(pt.data, T[qtype])
    assert got.shape == (rows, n_in)
    assert np.array_equal(got, expect)  # bit-exact: our layout is what the reference reader sees
    # d is the master's scale in fp16; the codes are the master's codes
    gidx = (np.arange(n_in // 32) * 32) // eff
    assert np.array_equal(d16, scale[:, gidx].astype(np.float16))
    # only fp16 rounding of (d, m) separates the file from the master; the report measures it
    ref = master_dequant(codes, scale, zero, eff)
    err = float((((ref - got) ** 2) * hdiag).sum())
    assert pt.added_error == pytest.approx(err, rel=1e-6, abs=1e-30)
    assert pt.rel_error < 2e-6
    assert np.abs(ref - got).max() <= 2e-3 * np.abs(ref).max() + 1e-7


def test_compensated_min_beats_plain_rounding():
    rng = np.random.default_rng(3)
    codes, scale, zero = _params(16, 256, 32, 4, rng)
    h = np.ones(256)
    pt = pack_exact(codes, scale, zero, 32, 4, h, TYPES["Q4_1"])
    ref = master_dequant(codes, scale, zero, 32)
    gidx = np.arange(8)
    plain = _rep(scale[:, gidx].astype(np.float16), 32) * codes + _rep((-scale[:, gidx].astype(np.float64) * zero[:, gidx]).astype(np.float16), 32)
    assert pt.added_error <= float(((ref - plain) ** 2).sum()) + 1e-12


def test_exact_pack_refuses_what_it_cannot_hold():
    rng = np.random.default_rng(1)
    codes, scale, zero = _params(4, 96, 48, 4, rng)
    with pytest.raises(NotRepresentable, match="group size 48"):
        pack_exact(codes, scale, zero, 48, 4, None, TYPES["Q4_1"])
    codes, scale, zero = _params(4, 80, 80, 4, rng)
    with pytest.raises(NotRepresentable, match="input dim 80"):
        pack_exact(codes, scale, zero, 80, 4, None, TYPES["Q4_1"])
    codes, scale, zero = _params(4, 64, 32, 5, rng)
    with pytest.raises(NotRepresentable, match="5-bit"):
        pack_exact(codes, scale, zero, 32, 5, None, TYPES["Q4_1"])
    codes, scale, zero = _params(4, 64, 32, 4, rng)
    scale[2, 1] = 1e6
    with pytest.raises(NotRepresentable, match="fp16"):
        pack_exact(codes, scale, zero, 32, 4, None, TYPES["Q4_1"])


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1"])
def test_refit_fallback_is_a_good_weighted_fit(qtype):
    rng = np.random.default_rng(2)
    codes, scale, zero = _params(8, 96, 48, 4, rng)  # g48 straddles 32-blocks
    w = master_dequant(codes, scale, zero, 48)
    h = rng.uniform(0.1, 2, 96)
    pt = refit_legacy(TYPES[qtype], w, h, "g48")
    assert not pt.exact and pt.added_error > 0
    got = dequantize(pt.data, T[qtype])
    err = float((((w - got) ** 2) * h).sum())
    assert pt.added_error == pytest.approx(err, rel=1e-6)
    # no worse than llama.cpp's own min-max round-to-nearest on the same weights
    rtn = dequantize(quantize(w.astype(np.float32), T[qtype]), T[qtype])
    assert err <= float((((w - rtn) ** 2) * h).sum()) * 1.0001


def test_k_packers_bit_exact():
    rows, n = 3, 512
    r = RNG
    D = r.random((rows, n // 256)).astype(np.float16)
    Dm = r.random((rows, n // 256)).astype(np.float16)
    Df, Dmf = _rep(D, 256), _rep(Dm, 256)
    q = r.integers(0, 16, (rows, n)); sc = r.integers(0, 64, (rows, n // 32)); mn = r.integers(0, 64, (rows, n // 32))
    exp = (Df * _rep(sc, 32)) * q - Dmf * _rep(mn, 32)
    assert np.array_equal(dequantize(P.pack_q4_k(q, sc, mn, D, Dm), T.Q4_K), exp.astype(np.float32))
    q = r.integers(0, 4, (rows, n)); sc = r.integers(0, 16, (rows, n // 16)); mn = r.integers(0, 16, (rows, n // 16))
    exp = (Df * _rep(sc, 16)) * q - Dmf * _rep(mn, 16)
    assert np.array_equal(dequantize(P.pack_q2_k(q, sc, mn, D, Dm), T.Q2_K), exp.astype(np.float32))
    q = r.integers(0, 8, (rows, n)); sc = r.integers(-32, 32, (rows, n // 16))
    exp = (Df * _rep(sc, 16)) * (q - 4)
    assert np.array_equal(dequantize(P.pack_q3_k(q, sc, D), T.Q3_K), exp.astype(np.float32))
    q = r.integers(0, 64, (rows, n)); sc = r.integers(-128, 128, (rows, n // 16))
    exp = (Df * _rep(sc, 16)) * (q - 32)
    assert np.array_equal(dequantize(P.pack_q6_k(q, sc, D), T.Q6_K), exp.astype(np.float32))


def test_float_quantizers():
    w = (RNG.standard_normal((4, 512)) * np.array([[1e-3], [1.0], [30.0], [0.0]])).astype(np.float32)
    assert np.array_equal(P.quantize_q8_0(w), quantize(w, T.Q8_0))  # same rule as the reference
    back = dequantize(P.quantize_q6_k(w), T.Q6_K)
    rel = np.sqrt(((back - w) ** 2).mean(1)) / np.maximum(np.sqrt((w**2).mean(1)), 1e-30)
    assert np.all(rel[:3] < 0.03) and np.all(back[3] == 0)


def test_rope_permutation_matches_the_reshape_form():
    n_head, hd = 4, 16
    rows = np.arange(n_head * hd)
    ref = rows.reshape(n_head, 2, hd // 2).swapaxes(1, 2).reshape(-1)
    assert np.array_equal(rope_permutation(n_head * hd, n_head), ref)


def test_detect_pre():
    bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    assert detect_pre({"pre_tokenizer": bl}) == "gpt-2"
    assert detect_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, bl]}}) == "smollm"
    assert detect_pre({"pre_tokenizer": {"type": "Whitespace"}}) is None
