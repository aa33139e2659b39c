"""GGUF per family, beyond the logits of tests/test_family_matrix.py: the tensors and keys each family's file holds,
read back with gguf's reader and checked against gguf-py's own tensor list for the architecture
(gguf.MODEL_TENSORS), the stored norm offset, the query-scale fold, phi3's fused rows, what llama.cpp cannot run
refused before any output, and K-quant-aware / mixture masters of non-llama families exported unchanged."""
import json
import re
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.gguf import export_gguf
from neuqi_export.archs import family_for
from neuqi_export.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixtures import build_master, build_model, build_tokenizer, corpus, make_tiny, windows  # noqa: E402
from model_factory import dense_families  # noqa: E402

_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def _kv(reader) -> dict:
    out = {}
    for k, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and f.types[-1] != gguf.GGUFValueType.STRING:
            out[k] = [f.parts[i].tolist()[0] for i in f.data]
        elif f.types:
            out[k] = f.contents()
    return out


DENSE = dense_families()
MOE = [mt for mt in ("qwen3_moe", "mixtral")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{model_type: (master, GGUFReader, kv)}: every dense family, 4-bit g32 masters as Q4_1 with F32 floats."""
    tmp = tmp_path_factory.mktemp("gguf_fam")
    out = {}
    for mt in DENSE:
        master, _ = make_tiny(tmp, mt, bits=4, group_size=32)
        path = tmp / f"{mt}.gguf"
        export_gguf(master, path, qtype="Q4_1", embed_type="F32", output_type="F32")
        r = gguf.GGUFReader(str(path))
        out[mt] = (master, r, _kv(r))
    return out


@pytest.mark.parametrize("mt", DENSE)
def test_tensor_names_are_the_architectures_own(exported, mt):
    """Every tensor is one gguf-py lists for the family's architecture, each block has the norms of the family's
    roles under llama.cpp's names, and every HF tensor of the master has its GGUF counterpart."""
    master, r, kv = exported[mt]
    fam = family_for(mt)
    assert kv["general.architecture"] == fam.gguf_arch
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[_ARCH[fam.gguf_arch]]}
    names = {t.name for t in r.tensors}
    for n in names:
        base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", n).rsplit(".", 1)[0]
        assert base in allowed, (mt, n)
    role_names = {"attn_in": "attn_norm", "attn_out": "post_attention_norm", "ffn_in": "ffn_norm",
                  "ffn_out": "post_ffw_norm", "q": "attn_q_norm", "k": "attn_k_norm"}
    n_layers = master.config["num_hidden_layers"]
    for i in range(n_layers):
        for role in fam.norms.present():
            assert f"blk.{i}.{role_names[role]}.weight" in names, (mt, role)
    n_norm = sum(1 for n in names if n.endswith("norm.weight"))
    assert n_norm == len(fam.norm_names(master.config))
    n_lin = sum(1 for n in names if n.startswith("blk.") and not n.endswith("norm.weight") and n.endswith(".weight"))
    assert n_lin == len(master.linears)


def test_norm_offset_stored_and_query_fold(exported):
    """Gemma: every norm is stored as w + 1 (llama.cpp multiplies by the stored weight); other families as w.
    The tiny Gemmas' query_pre_attn_scalar (24) is not head_dim (16), which llama.cpp assumes: gemma3 carries
    sqrt(16/24) in its q norm, gemma2 (no q norm) in attn_q's block scales."""
    for mt in ("gemma3_text", "gemma2", "qwen3"):
        master, r, _ = exported[mt]
        t = {x.name: np.asarray(x.data) for x in r.tensors}
        off = family_for(mt).norm_offset
        np.testing.assert_allclose(t["output_norm.weight"], master.tensors["model.norm.weight"].numpy() + off, rtol=1e-6)
        np.testing.assert_allclose(t["blk.1.attn_norm.weight"],
                                   master.tensors["model.layers.1.input_layernorm.weight"].numpy() + off, rtol=1e-6)
    fold = (16 / 24) ** 0.5
    master, r, _ = exported["gemma3_text"]
    t = {x.name: x for x in r.tensors}
    np.testing.assert_allclose(np.asarray(t["blk.0.attn_q_norm.weight"].data),
                               (master.tensors["model.layers.0.self_attn.q_norm.weight"].numpy() + 1) * fold, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(t["blk.0.attn_k_norm.weight"].data),
                               master.tensors["model.layers.0.self_attn.k_norm.weight"].numpy() + 1, rtol=1e-6)
    master, r, _ = exported["gemma2"]
    tq = next(x for x in r.tensors if x.name == "blk.0.attn_q.weight")
    got = gguf.quants.dequantize(np.asarray(tq.data), tq.tensor_type)
    want = master.linears["model.layers.0.self_attn.q_proj"].dequantize().numpy() * fold
    assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()


def test_family_keys(exported):
    """Sliding windows with the per-layer pattern and the sliding layers' rope base, soft-caps, Granite's scales."""
    _, _, kv = exported["gemma3_text"]
    assert kv["gemma3.attention.sliding_window"] == 8
    assert kv["gemma3.attention.sliding_window_pattern"] == [True, True, False]
    assert kv["gemma3.rope.freq_base"] == pytest.approx(1e6) and kv["gemma3.rope.freq_base_swa"] == pytest.approx(1e4)
    assert kv["gemma3.final_logit_softcapping"] == pytest.approx(8.0)
    _, _, kv = exported["gemma2"]
    assert kv["gemma2.attention.sliding_window_pattern"] == [True, False, True]
    assert kv["gemma2.attn_logit_softcapping"] == pytest.approx(5.0)
    assert kv["gemma2.final_logit_softcapping"] == pytest.approx(8.0)
    _, _, kv = exported["granite"]
    assert (kv["granite.embedding_scale"], kv["granite.attention.scale"], kv["granite.residual_scale"],
            kv["granite.logit_scale"]) == pytest.approx((4.0, 0.2, 0.5, 2.0))
    for mt in ("llama", "qwen3", "phi3", "smollm3"):
        assert not any("sliding_window" in k or "softcap" in k for k in exported[mt][2]), mt


def test_phi3_fused_rows(exported):
    """phi3: qkv_proj -> attn_qkv ((h + 2 kv) * hd rows), gate_up_proj -> ffn_up (2 I rows), no ffn_gate; the
    rows are the master's, unpermuted."""
    master, r, _ = exported["phi3"]
    t = {x.name: x for x in r.tensors}
    assert "blk.0.ffn_gate.weight" not in t and "blk.0.attn_q.weight" not in t
    for name, hf, rows in (("attn_qkv", "self_attn.qkv_proj", (4 + 2 * 2) * 16), ("ffn_up", "mlp.gate_up_proj", 256)):
        got = gguf.quants.dequantize(np.asarray(t[f"blk.1.{name}.weight"].data), t[f"blk.1.{name}.weight"].tensor_type)
        want = master.linears[f"model.layers.1.{hf}"].dequantize().numpy()
        assert got.shape == want.shape == (rows, 64)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


@pytest.mark.parametrize("mt, knobs, what", [
    ("smollm3", dict(num_hidden_layers=3, no_rope_layers=[1, 0, 1]), "rotary on layers"),
    ("phi3", dict(hidden=128), "heads x head_dim"),
    ("llama", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0] * 8,
                                    "short_factor": [1.0] * 8, "original_max_position_embeddings": 64}),
     "rope scaling 'longrope'"),  # llama.cpp reads LongRoPE's factors in phi3's code only
    ("qwen3", dict(sliding_window=8, use_sliding_window=True, layer_types=["sliding_attention", "full_attention"]), "sliding-window"),
])
def test_refused_before_any_output(tmp_path, mt, knobs, what):
    """A config llama.cpp's code for the family would run differently: one line naming the family, no file."""
    tok = tmp_path / "tok"
    n = build_tokenizer(tok, "smollm")
    master = build_master(build_model(mt, n, **knobs), tok, bits=4, group_size=32)
    with pytest.raises(UserError, match=what) as exc:
        export_gguf(master, tmp_path / "x.gguf", qtype="Q4_1")
    assert mt in str(exc.value) and "\n" not in str(exc.value)
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("n_orig, which", [(4096, "short"), (16, "long")])
def test_phi3_longrope_runs_in_llamacpp_as_the_master(tmp_path, n_orig, which):
    """Phi-3/Phi-4 LongRoPE: rope_factors_long/short and the attention factor sqrt(1 + ln s / ln n_orig) (s = 8192 /
    n_orig) in the file; llama.cpp takes the long factors when its context (2048) exceeds n_orig, transformers when
    the sequence (24 tokens) does, so n_orig 4096 runs the short ones in both and n_orig 16 the long ones. The
    factors differ per frequency, so the wrong set (or no factors, or no attention factor) moves the logits."""
    from neuqi_export.modeling import master_to_hf
    from runtimes.llamacpp import LlamaCppScorer

    rng = np.random.default_rng(3)
    short, long = rng.uniform(1.0, 1.5, 4).tolist(), rng.uniform(2.0, 6.0, 4).tolist()  # rotary width 8 (factor 0.5)
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long, "short_factor": short,
            "original_max_position_embeddings": n_orig, "partial_rotary_factor": 0.5}
    tok = tmp_path / "tok"
    n = build_tokenizer(tok, "smollm")
    model = build_model("phi3", n, rope_parameters=rope, max_position_embeddings=8192, original_max_position_embeddings=n_orig)
    master = build_master(model, tok, bits=4, group_size=32)
    path = tmp_path / "phi3.gguf"
    export_gguf(master, path, qtype="F32", embed_type="F32", output_type="F32")
    kv = _kv(gguf.GGUFReader(str(path)))
    t = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(str(path)).tensors}
    np.testing.assert_array_equal(t["rope_factors_long.weight"], np.float32(long))
    np.testing.assert_array_equal(t["rope_factors_short.weight"], np.float32(short))
    s = 8192 / n_orig
    assert kv["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(s) / np.log(n_orig)) ** 0.5)
    assert kv["phi3.rope.scaling.original_context_length"] == n_orig
    ids = windows(tok, n=2)
    got = np.asarray(LlamaCppScorer(path).logits(ids), np.float64)
    with torch.no_grad():
        ref = master_to_hf(master)(torch.from_numpy(ids)).logits.numpy().astype(np.float64)
    err = np.abs(got[..., : ref.shape[-1]] - ref).max() / np.abs(ref).max()
    assert err < 2e-3, (which, err)


@pytest.mark.parametrize("mt, preset", [("qwen3", "Q4_K_M"), ("gemma3_text", "Q3_K_M")])
def test_kquant_aware_master_of_a_family(tmp_path, mt, preset):
    """--for-gguf / convert --gguf-fit lattice on qwen3 and gemma3: each linear quantized on its preset type's
    lattice, written unchanged (exact), and the file runs in llama.cpp close to the master."""
    from converters.gguf.presets import linear_types, preset_plan
    from neuqi_export.master import GGUFLinear, MasterCheckpoint
    from neuqi_export.modeling import master_to_hf
    from neuqi_export.pipeline import QuantizeOptions, quantize_model
    from runtimes.llamacpp import LlamaCppScorer

    d = tmp_path / "model"
    vocab = build_tokenizer(d, "smollm")
    build_model(mt, vocab, hidden=256, intermediate=512).save_pretrained(str(d))
    config = json.loads((d / "config.json").read_text())
    types = linear_types(config, preset=preset)
    opts = QuantizeOptions(bits=4, group_size=32, gptq=True, nsamples=4, seqlen=64, gguf_types=types)
    quantize_model(d, tmp_path / "m", opts, calib_text="\n".join(corpus(300, seed=9)), progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    assert all(isinstance(lin, GGUFLinear) for lin in master.linears.values())
    assert any(t.endswith("_K") for t in types.values())
    out = tmp_path / "m.gguf"
    rep = export_gguf(master, out, preset=preset, embed_type="F32")
    plan = preset_plan(preset, master.config)
    file_t = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    lin_reports = [t for t in rep.tensors if t.name.startswith("blk.") and t.type != "F32"]
    assert len(lin_reports) == len(master.linears) and all(t.exact for t in lin_reports)
    assert all(file_t[t.name] == plan[t.name][0] for t in lin_reports)
    ids = windows(d, n=2, length=24)
    with torch.no_grad():
        ref = master_to_hf(master)(torch.from_numpy(ids)).logits.numpy()
    sc = LlamaCppScorer(out, n_ctx=64)
    got = sc.logits(ids)
    sc.close()
    diff = np.abs(got - ref)
    assert diff.max() / np.abs(ref).max() < 0.10 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85


def test_export_original_of_a_family(tmp_path):
    """export_original (the HF model's own weights, F16) for gemma3: norms + 1, runs in llama.cpp like transformers."""
    from converters.gguf import export_original
    from runtimes.llamacpp import LlamaCppScorer

    d = tmp_path / "g3"
    vocab = build_tokenizer(d, "smollm")
    model = build_model("gemma3_text", vocab)
    model.save_pretrained(str(d))
    out = tmp_path / "f16.gguf"
    export_original(d, out, qtype="F32")
    ids = windows(d, n=2, length=24)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    sc = LlamaCppScorer(out, n_ctx=64)
    got = sc.logits(ids)
    sc.close()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.01


def test_cli_convert_and_for_gguf_phi3(tmp_path, capsys):
    """`convert --to gguf --type Q4_K_M` (K-quant-aware, the default fit) and `quantize --for-gguf Q4_K` + `export`
    on phi3: the fused attn_qkv / ffn_up get llama-quantize's types (attn_qkv: attn_v's rules) and load in llama.cpp."""
    from converters.gguf.presets import preset_plan
    from neuqi_export.cli import main
    from runtimes.llamacpp import LlamaCppScorer

    d = tmp_path / "phi3"
    vocab = build_tokenizer(d, "smollm")
    build_model("phi3", vocab, hidden=256, intermediate=512, head_dim=64).save_pretrained(str(d))
    (tmp_path / "calib.txt").write_text("\n".join(corpus(300, seed=4)))
    calib = ["--calib", str(tmp_path / "calib.txt"), "--nsamples", "2", "--seqlen", "64", "--quiet"]
    out = tmp_path / "c.gguf"
    assert main(["convert", str(d), "--to", "gguf", "--type", "Q4_K_M", "--gptq", "-o", str(out), *calib]) == 0
    plan = preset_plan("Q4_K_M", json.loads((d / "config.json").read_text()))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.attn_qkv.weight"] == plan["blk.1.attn_qkv.weight"][0] == "Q6_K"  # attn_v's rule: more_bits(1, 2)
    assert types["blk.0.attn_qkv.weight"] == "Q4_K"
    assert types["blk.1.ffn_up.weight"] == "Q4_K" and "blk.0.ffn_gate.weight" not in types
    assert main(["quantize", str(d), "-o", str(tmp_path / "m"), "--for-gguf", "Q4_K", "--gptq", *calib]) == 0
    assert main(["export", str(tmp_path / "m"), "--to", "gguf", "--type", "Q4_K", "-o", str(tmp_path / "k.gguf")]) == 0
    assert "Q4_K" in capsys.readouterr().out
    for path in (out, tmp_path / "k.gguf"):
        sc = LlamaCppScorer(path, n_ctx=64)
        assert sc.logits(windows(d, n=1, length=16)).shape == (1, 16, vocab)
        sc.close()


def test_untied_head_refused_where_the_arch_has_none(tmp_path):
    """gemma2 in llama.cpp has no output tensor (always tied): an untied gemma2 is refused, nothing written."""
    tok = tmp_path / "tok"
    n = build_tokenizer(tok, "smollm")
    master = build_master(build_model("gemma2", n, tie_word_embeddings=False), tok, bits=4, group_size=32)
    with pytest.raises(UserError, match="gemma2: .*ties the output head"):
        export_gguf(master, tmp_path / "x.gguf", qtype="Q4_1")
    assert not list(tmp_path.glob("*.gguf*")) and not list(tmp_path.glob(".x.gguf*"))


@pytest.mark.parametrize("mt", MOE)
def test_moe_experts_stacked_as_llamacpp_reads_them(tmp_path, mt):
    """MoE: each block's per-expert linears stacked into ffn_{gate,up,down}_exps (experts, rows, row bytes), the
    router ffn_gate_inp F32. The Q4_1 stacks dequantize (gguf-py) to the master's experts bit for bit, and the
    F32 file runs in llama.cpp as the master (max rel < 2e-3; measured 8e-4 / 1e-3). The exact Q4_1 file is only
    close there: llama.cpp rounds the router's input to Q8 too, which flips a top-k choice on a few tokens
    (measured at 3 bits: max rel 0.69 / 0.39, mean 0.07 / 0.04, argmax 95%), so the matrix checks it by its mean."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import family_matrix as fm

    from neuqi_export.master import MasterCheckpoint

    md = fm.tiny_master(mt, 4, tmp_path, "neuqi")
    master = MasterCheckpoint.load(md)
    n_exp = master.config.get("num_experts") or master.config["num_local_experts"]
    q4 = tmp_path / "q4.gguf"
    export_gguf(master, q4, qtype="Q4_1", embed_type="F32", output_type="F32")
    tensors = {t.name: t for t in gguf.GGUFReader(str(q4)).tensors}
    for k in range(master.config["num_hidden_layers"]):
        assert tensors[f"blk.{k}.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        for role, part in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            t = tensors[f"blk.{k}.ffn_{role}_exps.weight"]
            got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            want = np.stack([master.linears[f"model.layers.{k}.mlp.experts.{e}.{part}"].dequantize().numpy()
                             for e in range(n_exp)])
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()  # fp16 d and m of the exact Q4_1 blocks
    assert not any(".experts." in n for n in tensors)
    f32 = tmp_path / "f32.gguf"
    info = fm.export(md, "gguf", f32, {"qtype": "F32", "embed_type": "F32", "output_type": "F32"})
    ids = fm.windows(int(master.config["vocab_size"]))
    ref = fm.reference_logits(md, ids).astype(np.float64)
    _, got = fm.runtime_logits(Path(info["path"]), ids)
    assert np.abs(got[..., : ref.shape[-1]] - ref).max() / np.abs(ref).max() < 2e-3
