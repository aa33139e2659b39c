"""The GGUF tokenizer keys (converters/gguf/vocab.py): a SentencePiece-style tokenizer.json (Gemma-3) written as
llama.cpp's SPM vocabulary tokenizes real text exactly as the HF tokenizer does, checked in llama.cpp itself."""
import json

import gguf
import pytest

from converters.gguf import metadata, vocab

LLAMA2_STYLE = {  # how HF writes a Llama-2 SentencePiece model as tokenizer.json: a "▁" is put before the text
    "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                       {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
    "pre_tokenizer": None,
    "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                                                 {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
    "model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []},
}
GEMMA_STYLE = {**LLAMA2_STYLE, "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
               "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}}
METASPACE = {**LLAMA2_STYLE, "normalizer": None, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
             "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"}}
BYTE_LEVEL = {"pre_tokenizer": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
              "model": {"type": "BPE", "byte_fallback": False, "vocab": {}, "merges": []}}


def test_spm_style_bpe_is_told_from_byte_level_bpe_and_its_space_prefix_read():
    assert vocab.is_spm_bpe(LLAMA2_STYLE) and vocab.is_spm_bpe(GEMMA_STYLE) and vocab.is_spm_bpe(METASPACE)
    assert not vocab.is_spm_bpe(BYTE_LEVEL)
    assert vocab.space_prefix(LLAMA2_STYLE) and vocab.space_prefix(METASPACE)
    assert not vocab.space_prefix(GEMMA_STYLE)
    assert not vocab.space_prefix({**METASPACE, "pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "never"}})


def test_spm_scores_follow_the_first_merge_that_makes_each_piece():
    v = {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5, "zz": 6}
    merges = [["a", "b"], "b c", ["ab", "c"], ["a", "bc"]]  # both merge formats; "abc" made twice, first at rank 2
    s = vocab.spm_scores(v, merges, 8)
    assert s[:3] == [0.0, 0.0, 0.0]  # single characters are never a merge result
    assert (s[3], s[5], s[4]) == (-1.0, -2.0, -3.0)  # earlier merge -> higher score (llama.cpp merges it first)
    assert s[6] == s[7] == -5.0  # a piece no merge makes, and an id beyond the vocabulary: merged last


def _vocab_only_gguf(tok_dir, path):
    cfg = json.loads((tok_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    w = gguf.GGUFWriter(str(path), "gemma3")
    metadata.add_hparams(w, cfg, cfg["vocab_size"], {"rope_theta": 10000.0})
    info = vocab.add_tokenizer(w, tok_dir, cfg["vocab_size"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return info


@pytest.mark.integration
def test_gemma3_tokenizer_in_llamacpp_matches_hf_on_real_text(gemma_dir, real_assets, tmp_path):
    import llama_cpp
    from transformers import AutoTokenizer

    from neuqi_export.data import read_text

    path = tmp_path / "vocab.gguf"
    info = _vocab_only_gguf(gemma_dir, path)
    assert info["model"] == "llama" and info["add_bos"] is True
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is False
    lm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(str(gemma_dir))
    paragraphs = [p for p in read_text(real_assets.eval_text).split("\n\n") if p.strip()][:40]
    tricky = ["  leading spaces", "tabs\tand\nnewlines\n\n\n", "digits 1234567 3.14159", "\u00e9moji \U0001f916 \u4e2d\u6587 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
              "\x00\x01 control bytes", "trailing   ", " ", "x" * 300, "\u00dcn\u00efc\u00f6d\u00e9 \ufb01 ligature"]
    n_tokens = 0
    for text in paragraphs + tricky:
        want = hf(text, add_special_tokens=True)["input_ids"]
        got = lm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        assert got == want, (text[:60], got[:16], want[:16])
        n_tokens += len(want)
    assert n_tokens > 10000  # real text, not a handful of words
    # a special token written in the text is parsed as one when asked, as HF does by default
    assert lm.tokenize(b"<bos> literal", add_bos=True, special=True) == hf("<bos> literal")["input_ids"]
