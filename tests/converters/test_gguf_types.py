"""converters/gguf/types.py, one row per GGUF type: its facts against gguf-py's own tables, the views derived from
the rows, llama-quantize's fallbacks."""
import gguf
import numpy as np
import pytest

from converters.gguf.types import FLOAT_TYPES, SINGLE_TYPES, TYPES, fallback_type


@pytest.mark.parametrize("name", sorted(TYPES))
def test_row_agrees_with_gguf_py(name):
    row = TYPES[name]
    t = gguf.GGMLQuantizationType[name]
    block, size = gguf.GGML_QUANT_SIZES[t]
    assert row.block == block and row.name == name
    if row.file_type is not None:  # what general.file_type says for a file of this one type
        assert row.file_type.name in ("ALL_F32", f"MOSTLY_{name}", f"MOSTLY_{name}_S")
    if row.levels:  # the lattice's packer writes gguf's bytes per block, and they dequantize back
        rows, n = 2, 256 * 2
        w = np.random.default_rng(0).standard_normal((rows, n))
        params, q = row.fit(w, np.ones(n))
        data = row.pack(params, q)
        assert data.shape == (rows, n // block * size) and data.dtype == np.uint8
        back = gguf.quants.dequantize(data, t)
        assert np.abs(back - w).max() < np.abs(w).max()  # the fitted blocks are near w, not garbage


def test_views_of_the_rows():
    assert SINGLE_TYPES == ("F32", "F16", "Q8_0", "Q4_1", "Q5_1", "Q4_K", "Q3_K", "Q2_K", "Q4_0", "Q5_0", "IQ4_NL")
    assert FLOAT_TYPES == ("auto", "F32", "F16", "Q8_0", "Q6_K", "Q4_1", "Q5_1", "Q4_0", "Q5_0", "IQ4_NL")
    assert [t for t, r in TYPES.items() if r.exact_capable] == ["Q4_1", "Q5_1"]
    # tried exact first, refit when the master's codes do not fit (IQ4_NL: always, its values are not uniform)
    assert [t for t, r in TYPES.items() if r.tries_exact] == ["Q8_0", "Q4_1", "Q5_1", "Q4_0", "Q5_0", "IQ4_NL"]
    # general.file_type of a file whose linears are all that type: llama-quantize's ftype of the same name
    assert {t: TYPES[t].file_type for t in ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL")} == {
        "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0, "IQ4_NL": gguf.LlamaFileType.MOSTLY_IQ4_NL}
    assert [t for t, r in TYPES.items() if r.stores_master] == ["F32", "F16", "Q4_1", "Q5_1"]
    # bits: what a uniform grid of the type holds (presets.py's docstring, read from llama.cpp's block layouts)
    assert {t: r.bits for t, r in TYPES.items()} == {
        "F32": 32, "F16": 16, "Q8_0": 8, "Q6_K": 6, "Q4_1": 4, "Q5_1": 5, "Q5_K": 5, "Q4_K": 4, "Q3_K": 3, "Q2_K": 2,
        "Q4_0": 4, "Q5_0": 5, "IQ4_NL": 4}


def test_fallbacks_are_llama_quantizes():
    assert {t: r.fallback for t, r in TYPES.items() if r.fallback} == {
        "Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "IQ4_NL", "Q2_K": "IQ4_NL"}
    assert fallback_type("Q4_K", 576) == "Q5_0" and fallback_type("Q4_K", 100) == "F16"
    assert fallback_type("Q4_1", 64) == "Q4_1" and fallback_type("Q4_1", 48) == "F16"
    # llama-quantize has no fallback for the 32-blocks (it stops on such a row); ours is F16
    assert [fallback_type(t, 48) for t in ("Q8_0", "Q4_0", "Q5_0", "IQ4_NL")] == ["F16"] * 4


def test_head_type_is_llama_quantizes():
    """output.weight / tied token_embd (llama-quant.cpp): Q8_0 when n_embd is not a multiple of the base's block
    or the base is Q8_0, else Q6_K, which falls back to Q8_0 when n_embd % 256 != 0."""
    from converters.gguf.types import head_type

    assert [head_type(b, 576) for b in ("Q4_0", "Q5_0", "IQ4_NL", "Q8_0", "Q4_K")] == ["Q8_0"] * 5
    assert [head_type(b, 1024) for b in ("Q4_0", "Q5_0", "IQ4_NL", "Q4_1", "Q4_K")] == ["Q6_K"] * 5
    assert head_type("Q8_0", 1024) == "Q8_0" and head_type("Q4_K", 96) == "Q8_0"
