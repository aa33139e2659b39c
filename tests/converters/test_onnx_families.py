"""ONNX export of every registered family beyond what the family matrix checks: the KV cache decoded token by
token equals the full forward (sliding-window and NoPE layers included), each layer's cache has its own dims,
LongRoPE switches tables as transformers does, genai_config.json is written exactly for the families
onnxruntime-genai has a model type for (else one line says why), and a config feature the graph cannot express
is refused in one line before any output.

Masters are data-free (NeUQI parameters, round-to-nearest codes, g32) on the factory's tiny models; bound 1e-4
relative at accuracy level 1 (measured ~1e-6).
"""
import json

import numpy as np
import pytest
from model_factory import build_model as factory_model
from model_factory import families

from converters.onnx import export_onnx
from converters.onnx.export import build_model
from neuqi_export.archs import family_for
from neuqi_export.errors import UserError
from onnx_fixtures import build_master, reference_logits, rel_err  # noqa: E402

VOCAB = 200
_MASTERS = {}


def master_of(model_type, **config_kw):
    key = (model_type, json.dumps(config_kw, sort_keys=True))
    if key not in _MASTERS:
        _MASTERS[key] = build_master(factory_model(model_type, VOCAB, seed=3, **config_kw), 4, 32)
    return _MASTERS[key]


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _run(sess, ids, past=None, past_len=0):
    b, L = ids.shape
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + L), np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + L, dtype=np.int64), (b, 1))}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = (past[inp.name.replace("past_key_values.", "present.")] if past is not None
                              else np.zeros((b, inp.shape[1], 0, inp.shape[3]), np.float32))
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feed)))
    return out["logits"], out


@pytest.mark.parametrize("model_type", families())
def test_kv_cache_decode_equals_full_forward(model_type, one_thread):
    """20 tokens (longer than the sliding window of 8): full forward = master; a prefix of 3 then one token at a
    time through the cache = the full forward; each layer's cache input/output has that layer's dims."""
    master = master_of(model_type)
    model, g = build_model(master, accuracy_level=1, float_storage="exact")
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 20))
    sess = _session(model)
    full, out = _run(sess, ids)
    assert rel_err(full, reference_logits(master, ids)) < 1e-4
    for i, (kvh, hd) in enumerate(g.d.kv):
        inp = {x.name: x for x in sess.get_inputs()}[f"past_key_values.{i}.key"]
        assert [inp.shape[1], inp.shape[3]] == [kvh, hd] and out[f"present.{i}.value"].shape == (2, kvh, 20, hd)
    logits, out = _run(sess, ids[:, :3])
    steps = [logits]
    for t in range(3, ids.shape[1]):
        logits, out = _run(sess, ids[:, t:t + 1], past=out, past_len=t)
        steps.append(logits)
    assert rel_err(np.concatenate(steps, axis=1), full) < 1e-4


def test_sliding_window_really_masks():
    """gemma3_text's local layers see 8 tokens: a graph built without the windows differs from the master."""
    import dataclasses

    from converters.onnx.graph import DecoderGraph

    master = master_of("gemma3_text")
    model, g = build_model(master, accuracy_level=1, float_storage="exact")
    assert [a.window for a in g.d.attention] == [8, 8, None]
    assert len({s for s in g.d.rope}) == 2  # local and global rope bases
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 20))
    ref = reference_logits(master, ids)
    assert rel_err(_run(_session(model), ids)[0], ref) < 1e-4
    g = DecoderGraph(master, accuracy_level=1, float_storage="exact")
    g.d.attention = [dataclasses.replace(a, window=None) for a in g.d.attention]
    assert rel_err(_run(_session(g.build()), ids)[0], ref) > 1e-2


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.3, 1.7, 2.0],
            "long_factor": [3.0, 5.0, 9.0, 15.0]}


def test_longrope_switches_tables_like_transformers(one_thread):
    """phi3 LongRoPE (partial rotary 8 of 16, original context 16 of 64): a 12-token window uses the short factors,
    a 24-token one the long factors (transformers picks by max(position_ids) + 1); both match the master."""
    master = master_of("phi3", rope_parameters=LONGROPE, original_max_position_embeddings=16,
                       max_position_embeddings=64)
    model, g = build_model(master, accuracy_level=1, float_storage="exact")
    spec = g.d.rope[0]
    assert spec.dim == 8 and spec.switch == 16 and spec.scaling > 1
    sess = _session(model)
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 24))
    short_ref, long_ref = reference_logits(master, ids[:, :12]), reference_logits(master, ids)
    assert rel_err(long_ref[:, :12], short_ref) > 1e-2  # the switch matters
    assert rel_err(_run(sess, ids[:, :12])[0], short_ref) < 1e-4
    assert rel_err(_run(sess, ids)[0], long_ref) < 1e-4


@pytest.mark.parametrize("model_type", families())
def test_genai_config_only_where_genai_has_the_type(model_type, tmp_path):
    fam = family_for(model_type)
    out = tmp_path / "onnx"
    rep = export_onnx(master_of(model_type), out, accuracy_level=1, float_storage="exact")
    assert (out / "model.onnx").is_file()
    if fam.genai_type is None:
        assert not (out / "genai_config.json").exists()
        assert "\n" not in rep.advice and model_type in rep.advice and "genai_config.json" in rep.advice
        assert rep.advice in rep.summary().splitlines()
    else:
        cfg = json.loads((out / "genai_config.json").read_text())["model"]
        assert cfg["type"] == fam.genai_type and not rep.advice
        assert (cfg["decoder"]["num_key_value_heads"], cfg["decoder"]["head_size"]) == (2, 16)


def test_cli_prints_why_genai_config_is_left_out(tmp_path, capsys):
    from neuqi_export.cli import main

    no_genai = [f for f in families() if family_for(f).genai_type is None]
    assert no_genai  # olmo2: onnxruntime-genai's builder and runtime have no olmo2 type
    master_of(no_genai[0]).save(tmp_path / "master")
    assert main(["export", str(tmp_path / "master"), "--to", "onnx", "-o", str(tmp_path / "onnx"),
                 "--accuracy-level", "1", "--float-storage", "exact"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "genai_config.json" in ln]
    assert len(lines) == 1 and no_genai[0] in lines[0] and "onnxruntime" in lines[0]


@pytest.mark.parametrize("change, words", [
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "rope_type 'dynamic'"),
    (dict(use_bidirectional_attention=True), "bidirectional attention"),
])
def test_unsupported_feature_refused_in_one_line_before_output(tmp_path, capsys, change, words):
    from neuqi_export.cli import main

    master = master_of("qwen3")
    master.save(tmp_path / "master")
    cfg_file = tmp_path / "master" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "master"), "--to", "onnx", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and words in err and "ONNX" in err, err
    assert not out.exists() and {p.name for p in tmp_path.iterdir()} == {"master"}
    with pytest.raises(UserError, match=words):
        build_model(master.__class__.load(tmp_path / "master"))


def test_convert_refuses_before_quantizing(tmp_path, capsys, monkeypatch):
    """`convert --to onnx` on a model whose rope type the graph cannot express: one line, exit 2, before the
    quantizer runs (it is replaced by one that fails the test), nothing written."""
    import neuqi_export.pipeline as pipeline
    from neuqi_export.cli import main

    src = tmp_path / "model"
    factory_model("qwen3", VOCAB, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0,
                                                   "factor": 2.0}).save_pretrained(str(src))
    monkeypatch.setattr(pipeline, "quantize_model", lambda *a, **k: pytest.fail("quantized before refusing"))
    capsys.readouterr()  # (save_pretrained's progress bar)
    assert main(["convert", str(src), "--to", "onnx", "-o", str(tmp_path / "onnx"), "--bits", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "rope_type 'dynamic'" in err and "ONNX" in err, err
    assert {p.name for p in tmp_path.iterdir()} == {"model"}


@pytest.mark.parametrize("head_bits", [2, 4])
def test_scaled_embedding_of_a_quantized_tied_head(tmp_path, head_bits, one_thread):
    """gemma3_text with `--lm-head-bits`: the embedding is GatherBlockQuantized on the head's codes, then times
    sqrt(hidden) in the model dtype; logits (final soft-cap included) equal the master's."""
    import onnx
    from gguf_fixtures import build_tokenizer, corpus

    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.pipeline import QuantizeOptions, quantize_model
    from runtimes.onnxruntime import load

    n = build_tokenizer(tmp_path / "tok", "smollm")
    src = tmp_path / "src"
    factory_model("gemma3_text", n, seed=4).save_pretrained(str(src))
    for f in (tmp_path / "tok").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    quantize_model(src, tmp_path / "m", QuantizeOptions(bits=3, group_size=32, gptq=True, nsamples=4, seqlen=64,
                                                        lm_head_bits=head_bits),
                   calib_text="\n\n".join(corpus(200, seed=3)), progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    assert master.head_shares_embedding
    export_onnx(master, tmp_path / "onnx", accuracy_level=1, float_storage="exact")
    nodes = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node
    assert [nd.op_type for nd in nodes].count("GatherBlockQuantized") == 1
    assert [nd.op_type for nd in nodes if nd.name.startswith("/embed_tokens/scale")] == ["Mul"]
    ids = np.random.default_rng(5).integers(3, n, (1, 24))
    assert rel_err(load(tmp_path / "onnx", n_threads=1).logits(ids), reference_logits(master, ids)) < 1e-4
