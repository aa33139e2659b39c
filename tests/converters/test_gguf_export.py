"""End to end: tiny random llama (tied) / qwen2 (untied, biases, padded vocab) -> master -> GGUF ->
read back with gguf's reader and run in llama.cpp, compared with the toolkit's dequantized torch model.

Tolerance. llama.cpp quantizes the activations of every Q4_1/Q5_1 matmul to 8 bits (Q8_1 blocks of
32) on CPU. Measured on these models (3 windows x 24 tokens):
- the same GGUF with F32 linears instead of Q4_1: max|Δlogit|/max|logit| 0.1%, argmax 100%
  (so names, permutation, norms, biases, rope, tokenizer ids are right);
- Q4_1/Q5_1 linears, F32 embeddings/head: max rel 3.6-4.4%, rms(Δ)/std(logit) 2.5%, argmax 94-97%;
- the torch model with simulated 8-bit per-32 absmax activation rounding before each linear shows
  the same size of deviation from the float model (max rel 2.9-4.8%, rms rel 2.5-2.6%).
Bounds: max rel < 10%, rms rel < 6%, argmax agreement >= 85%. A layout bug gives O(100%).
"""
import importlib

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.gguf import export_gguf
from neuqi_export.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared builders, whatever pytest's import mode
from gguf_fixtures import make_tiny, windows  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    out["llama"] = (*make_tiny(tmp, "llama", bits=4, group_size=32), "Q4_1")
    out["qwen2"] = (*make_tiny(tmp, "qwen2", bits=5, group_size=96, pad_vocab=3), "Q5_1")  # g96: ragged last group
    return tmp, out


def _fields(path):
    r = gguf.GGUFReader(str(path))
    kv = {}
    for k, f in r.fields.items():
        if not f.types:
            continue
        if f.types[0] == gguf.GGUFValueType.STRING:
            kv[k] = f.contents()
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            kv[k] = len(f.data)
        else:
            kv[k] = f.contents()
    return r, kv


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_metadata_and_tensors(tiny, arch):
    tmp, models = tiny
    master, tok_dir, qtype = models[arch]
    out = tmp / f"{arch}.gguf"
    rep = export_gguf(master, out, qtype=qtype, overwrite=True)
    assert out.is_file() and not list(tmp.glob(f".{arch}.gguf*"))  # temp file renamed away
    cfg = master.config
    r, kv = _fields(out)
    a = arch
    assert kv["general.architecture"] == a
    assert kv["general.file_type"] == (3 if qtype == "Q4_1" else 9)
    assert kv["general.quantization_version"] == 2
    assert kv[f"{a}.context_length"] == cfg["max_position_embeddings"]
    assert kv[f"{a}.embedding_length"] == 64 and kv[f"{a}.block_count"] == 2
    assert kv[f"{a}.feed_forward_length"] == 128
    assert kv[f"{a}.attention.head_count"] == 4 and kv[f"{a}.attention.head_count_kv"] == 2
    assert kv[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert kv[f"{a}.rope.freq_base"] == pytest.approx(10000.0)
    assert kv[f"{a}.vocab_size"] == cfg["vocab_size"]
    assert kv["tokenizer.ggml.model"] == "gpt2"
    assert kv["tokenizer.ggml.pre"] == ("smollm" if arch == "llama" else "qwen2")
    assert kv["tokenizer.ggml.tokens"] == cfg["vocab_size"] and kv["tokenizer.ggml.token_type"] == cfg["vocab_size"]
    assert kv["tokenizer.ggml.merges"] > 100
    assert kv["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in kv["tokenizer.chat_template"]
    assert kv["tokenizer.ggml.add_bos_token"] is False
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types[f"blk.0.attn_q.weight"] == qtype and types["blk.1.ffn_down.weight"] == qtype
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    if arch == "llama":
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
        assert types["token_embd.weight"] == "Q8_0"  # llama-quantize: tied embd like the output, 64 % 256 != 0
    else:
        assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q5_1"  # untied embd: base type
        assert types["blk.0.attn_q.bias"] == "F32" and types["blk.1.attn_v.bias"] == "F32"
        assert kv["tokenizer.ggml.tokens"] == master.tensors["model.embed_tokens.weight"].shape[0]
    # every quantized linear is exact (codes unchanged, fp16 d/m)
    lin_reports = [t for t in rep.tensors if t.name.startswith("blk.") and t.type == qtype]
    assert len(lin_reports) == 14 and all(t.exact for t in lin_reports)
    # the q weight in the file = the master's q weight, rows permuted for llama's rotary layout
    tq = next(t for t in r.tensors if t.name == "blk.1.attn_q.weight")
    got = gguf.quants.dequantize(np.asarray(tq.data), tq.tensor_type)
    ref = master.linears["model.layers.1.self_attn.q_proj"].dequantize().numpy()
    if arch == "llama":
        ref = ref.reshape(4, 2, 8, 64).swapaxes(1, 2).reshape(64, 64)
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max()


def _compare(master, path, ids):
    from neuqi_export.modeling import master_to_hf
    from runtimes.llamacpp import LlamaCppScorer

    with torch.no_grad():
        ref = master_to_hf(master)(torch.from_numpy(ids)).logits.numpy()
    sc = LlamaCppScorer(path, n_ctx=128)
    got = sc.logits(ids)
    sc.close()
    d = np.abs(got - ref)
    return d.max() / np.abs(ref).max(), np.sqrt((d**2).mean()) / ref.std(), (got.argmax(-1) == ref.argmax(-1)).mean()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llamacpp_logits_match_master(tiny, arch):
    importlib.import_module("llama_cpp")  # a hard requirement: fails (never skips) without llama-cpp-python
    tmp, models = tiny
    master, tok_dir, qtype = models[arch]
    out = tmp / f"{arch}-f32emb.gguf"
    export_gguf(master, out, qtype=qtype, embed_type="F32", output_type="F32", overwrite=True)
    max_rel, rms_rel, agree = _compare(master, out, windows(tok_dir))
    print(f"{arch} {qtype}: max rel {max_rel:.4f}, rms rel {rms_rel:.4f}, argmax {agree:.3f}")
    assert max_rel < 0.10 and rms_rel < 0.06 and agree >= 0.85


def test_mistral_per_channel(tmp_path):
    """mistral -> GGUF llama arch (q/k permuted), untied head; per-channel 4-bit groups (G = in)."""
    master, tok_dir = make_tiny(tmp_path, "mistral", bits=4, group_size=-1)
    out = tmp_path / "mistral.gguf"
    rep = export_gguf(master, out, qtype="Q4_1", embed_type="F32", output_type="F32")
    assert all(t.exact for t in rep.tensors if t.type == "Q4_1")
    r, kv = _fields(out)
    assert kv["general.architecture"] == "llama" and "output.weight" in {t.name for t in r.tensors}
    max_rel, rms_rel, agree = _compare(master, out, windows(tok_dir))
    print(f"mistral per-channel Q4_1: max rel {max_rel:.4f}, rms rel {rms_rel:.4f}, argmax {agree:.3f}")
    assert max_rel < 0.10 and rms_rel < 0.06 and agree >= 0.85


def test_llamacpp_tokenizes_like_hf(tiny):
    """The pre-tokenizer name written is one llama.cpp applies the same way as the HF tokenizer."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tmp, models = tiny
    texts = ["Hello world, the capital of France is Paris.", "In 1999 there were 12345 cats!!  ok\n\nnew line",
             "it's  a gguf\tfile; don't   stop", "<|im_start|>user\nhi<|im_end|>"]
    for arch in ("llama", "qwen2"):
        master, tok_dir, qtype = models[arch]
        out = tmp / f"{arch}.tok.gguf"
        export_gguf(master, out, qtype=qtype, overwrite=True)
        hf = AutoTokenizer.from_pretrained(str(tok_dir))
        llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
        for t in texts:
            want = hf(t, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(t.encode(), add_bos=False, special=True) == want, (arch, t)
        llm.close()


def test_user_errors(tiny):
    tmp, models = tiny
    master, _, _ = models["qwen2"]  # 5-bit
    with pytest.raises(UserError, match="5-bit codes.*Q4_1"):
        export_gguf(master, tmp / "x.gguf", qtype="Q4_1")
    with pytest.raises(UserError, match="--type Q3_0"):
        export_gguf(master, tmp / "x.gguf", qtype="Q3_0")
    (tmp / "exists.gguf").write_bytes(b"")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(master, tmp / "exists.gguf", qtype="Q5_1")
    with pytest.raises(UserError, match="Q6_K needs"):
        export_gguf(master, tmp / "y.gguf", qtype="Q5_1", output_type="Q6_K")
    assert not (tmp / "y.gguf").exists() and not list(tmp.glob(".y.gguf*"))
    bad = type(master)(config={**master.config, "model_type": "gpt2"}, linears=master.linears, tensors=master.tensors,
                       tokenizer_dir=master.tokenizer_dir)
    with pytest.raises(UserError, match="unsupported architecture 'gpt2'"):
        export_gguf(bad, tmp / "z.gguf", qtype="Q5_1")


def test_registered_exporter(tiny):
    import argparse

    from converters.registry import load_all

    ex = load_all()["gguf"]
    p = argparse.ArgumentParser()
    ex.add_arguments(p)
    args = p.parse_args(["--type", "Q4_1", "--embed-type", "F16"])
    tmp, models = tiny
    master, _, _ = models["llama"]
    rep = ex.export(master, tmp / "reg.gguf", **ex.options(args))
    assert rep.path.is_file() and "exact" in rep.summary()
    assert {t.name: t.type for t in rep.tensors}["token_embd.weight"] == "F16"


def test_sentencepiece_tokenizer(tmp_path):
    """tokenizer.model present -> tokenizer.ggml.model = llama (SentencePiece); llama.cpp splits text like sentencepiece."""
    import json

    import sentencepiece as spm
    from llama_cpp import Llama

    from neuqi_export.master import MasterCheckpoint
    from gguf_fixtures import build_master, build_model, corpus

    tok_dir = tmp_path / "spm"
    tok_dir.mkdir()
    (tmp_path / "corpus.txt").write_text("\n".join(corpus()))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tok_dir / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   minloglevel=2)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    sp = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model"))
    master = build_master(build_model("llama", sp.vocab_size()), tok_dir, bits=4, group_size=32)
    master.save(tmp_path / "master")
    master = MasterCheckpoint.load(tmp_path / "master")  # tokenizer files + config.json side by side, as in real use
    out = tmp_path / "spm.gguf"
    rep = export_gguf(master, out, qtype="Q4_1")
    assert rep.tokenizer["model"] == "llama"
    _, kv = _fields(out)
    assert kv["tokenizer.ggml.model"] == "llama" and kv["tokenizer.ggml.scores"] == sp.vocab_size()
    assert kv["tokenizer.ggml.bos_token_id"] == 1 and kv["tokenizer.ggml.eos_token_id"] == 2
    llm = Llama(model_path=str(out), vocab_only=True, verbose=False)
    for t in ["Paris is the capital of France.", "hello world 1999 cats", "ünïcode → bytes"]:
        assert llm.tokenize(t.encode(), add_bos=False) == sp.encode(t), t
    llm.close()


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "linear", "rope_theta": 5000.0, "factor": 4.0},
])
def test_rope_scaling(tmp_path, rope):
    """llama3 scaling -> rope_freqs.weight; linear -> rope.scaling.*; llama.cpp then matches HF's rotary."""
    from gguf_fixtures import build_master, build_model, build_tokenizer

    tok_dir = tmp_path / "tok"
    n = build_tokenizer(tok_dir, "smollm")
    master = build_master(build_model("llama", n, rope=rope), tok_dir, bits=4, group_size=32)
    out = tmp_path / "rope.gguf"
    export_gguf(master, out, qtype="Q4_1", embed_type="F32", output_type="F32")
    r, kv = _fields(out)
    assert kv["llama.rope.freq_base"] == pytest.approx(rope["rope_theta"])
    names = {t.name for t in r.tensors}
    if rope["rope_type"] == "llama3":
        assert "rope_freqs.weight" in names
        f = np.asarray(next(t for t in r.tensors if t.name == "rope_freqs.weight").data)
        assert f.shape == (8,) and f[0] == 1.0 and f[-1] == pytest.approx(8.0) and np.all(np.diff(f) >= 0)
    else:
        assert "rope_freqs.weight" not in names
        assert kv["llama.rope.scaling.type"] == "linear" and kv["llama.rope.scaling.factor"] == pytest.approx(4.0)
    max_rel, rms_rel, agree = _compare(master, out, windows(tok_dir, n=2, length=48))
    print(f"rope {rope['rope_type']}: max rel {max_rel:.4f}, rms rel {rms_rel:.4f}, argmax {agree:.3f}")
    assert max_rel < 0.10 and rms_rel < 0.06 and agree >= 0.85


def test_refit_values_dispatch():
    """The one "float values -> a GGUF type" dispatch of _pack_linear and _pack_typed: floats as floats, each
    block type through its refit (diag-H weighted), F16 with the reason when the type's block does not divide n."""
    from converters.gguf.kquants import refit_k, refit_legacy
    from converters.gguf.types import TYPES
    from converters.gguf.writer import refit_values

    rng = np.random.default_rng(0)
    w, h = rng.standard_normal((4, 512)), rng.uniform(0.1, 2, 512)
    assert refit_values(w, h, "F32").qtype == "F32"
    f16 = refit_values(w, h, "F16")
    assert f16.qtype == "F16" and f16.note == "fallback to F16 (--type F16)"
    assert refit_values(w, h, "F16", f16_why="why").note == "fallback to F16 (why)"
    for qtype, direct in (("Q5_0", lambda: TYPES["Q5_0"].refit(w, h, "n")),
                          ("Q4_1", lambda: refit_legacy(TYPES["Q4_1"], w, h, "n")),
                          ("Q4_K", lambda: refit_k(TYPES["Q4_K"], w, h, 8, 512))):
        got, want = refit_values(w, h, qtype, "n"), direct()
        assert got.qtype == qtype and np.array_equal(got.data, want.data) and got.note == want.note
    short = rng.standard_normal((4, 576))
    assert refit_values(short, None, "Q4_K").note == "fallback to F16 (Q4_K does not divide input dim 576)"
    assert refit_values(short[:, :100], None, "Q4_1", undivided="odd").note == "fallback to F16 (odd)"
