"""End to end: tiny random llama (tied) / qwen2 (untied, biases) / mistral (sliding window) -> NeUQI
master -> ONNX directory -> onnxruntime, compared with the master's dequantized transformers model.

Exactness: with accuracy_level 1 (fp32 activations in MatMulNBits) the exported graph computes the same
function as `master_to_hf(master)` in float32; measured max|Δlogit|/max|logit| ~1e-6 at 2/3/4/8 bits in
both zero-point forms. Bound: 1e-4. Token-by-token decoding through the KV cache must reproduce the
full-window logits (same bound).
"""
import json

import numpy as np
import onnx
import pytest
import torch

from converters.onnx import export_onnx
from converters.onnx.export import build_model
from neuqi_export.errors import UserError
from onnx_fixtures import build_master, build_model as build_hf, reference_logits, rel_err  # noqa: E402

VOCAB = {"llama": 300, "qwen2": 500, "mistral": 260}
GROUP = 64  # down_proj has in_features 160: groups 64 + 64 + 32 (ragged)


@pytest.fixture(scope="module")
def hf_models():
    return {"llama": build_hf("llama", VOCAB["llama"]), "qwen2": build_hf("qwen2", VOCAB["qwen2"], seed=1)}


_MASTERS = {}


def master_for(hf_models, arch, bits, group_size=GROUP):
    key = (arch, bits, group_size)
    if key not in _MASTERS:
        _MASTERS[key] = build_master(hf_models[arch], bits, group_size)
    return _MASTERS[key]


def _ids(vocab, b=2, L=11, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (b, L))


def _session(model_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _run(sess, ids, past=None, past_len=0, kv=(2, 16), layers=2, dtype=np.float32):
    b, L = ids.shape
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, past_len + L), np.int64),
            "position_ids": np.tile(np.arange(past_len, past_len + L, dtype=np.int64), (b, 1))}
    for i in range(layers):
        for n in ("key", "value"):
            feed[f"past_key_values.{i}.{n}"] = (past[f"present.{i}.{n}"] if past is not None
                                                 else np.zeros((b, kv[0], 0, kv[1]), dtype))
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feed)))
    return out["logits"].astype(np.float32), out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_exact_logits_and_kv_cache(hf_models, arch, bits):
    master = master_for(hf_models, arch, bits)
    ids = _ids(VOCAB[arch])
    ref = reference_logits(master, ids)
    for form in ("fast", "float"):
        model, g = build_model(master, zero_point=form, accuracy_level=1, float_storage="exact")
        forms = {w.zero_point_form for _, w in g.reports}
        assert forms == ({"float"} if form == "float" and bits != 8 else {"uint8+correction"})
        assert any(w.K % w.block_size for _, w in g.reports)  # the ragged down_proj is in there
        sess = _session(model)
        full, _ = _run(sess, ids)
        assert rel_err(full, ref) < 1e-4, (form, rel_err(full, ref))
        # prefix of 4, then one token at a time through the KV cache
        logits, out = _run(sess, ids[:, :4])
        steps = [logits]
        for t in range(4, ids.shape[1]):
            logits, out = _run(sess, ids[:, t:t + 1], past=out, past_len=t)
            steps.append(logits)
        inc = np.concatenate(steps, axis=1)
        assert rel_err(inc, full) < 1e-4, (form, rel_err(inc, full))


def test_per_channel_and_block_replication(hf_models):
    """group_size -1 (one group per row): 128-wide blocks repeating the row's parameters, K=64 and K=160."""
    master = master_for(hf_models, "qwen2", 4, -1)
    ids = _ids(VOCAB["qwen2"], seed=3)
    ref = reference_logits(master, ids)
    for form in ("fast", "float"):
        model, g = build_model(master, zero_point=form, accuracy_level=1, float_storage="exact")
        assert {w.block_size for _, w in g.reports} == {64, 128}
        assert rel_err(_run(_session(model), ids)[0], ref) < 1e-4


def test_group_256_and_group_32(hf_models):
    master = master_for(hf_models, "llama", 4, 32)
    ids = _ids(VOCAB["llama"], seed=4)
    model, g = build_model(master, accuracy_level=1, float_storage="exact")
    assert {w.block_size for _, w in g.reports} == {32}
    assert rel_err(_run(_session(model), ids)[0], reference_logits(master, ids)) < 1e-4


def test_mistral_sliding_window():
    """A window of 5 tokens over 12-token inputs: the mask must drop keys older than the window."""
    hf = build_hf("mistral", VOCAB["mistral"], seed=2, sliding_window=5)
    master = build_master(hf, 4, GROUP)
    ids = _ids(VOCAB["mistral"], L=12, seed=5)
    ref = reference_logits(master, ids)
    sess = _session(build_model(master, accuracy_level=1, float_storage="exact")[0])
    full, _ = _run(sess, ids)
    assert rel_err(full, ref) < 1e-4
    logits, out = _run(sess, ids[:, :3])
    steps = [logits]
    for t in range(3, 12):
        logits, out = _run(sess, ids[:, t:t + 1], past=out, past_len=t)
        steps.append(logits)
    assert rel_err(np.concatenate(steps, 1), full) < 1e-4
    # and the window matters: without it the logits differ
    no_window = dict(master.config, sliding_window=None)
    master.config, saved = no_window, master.config
    try:
        other, _ = _run(_session(build_model(master, accuracy_level=1, float_storage="exact")[0]), ids)
    finally:
        master.config = saved
    assert rel_err(other, ref) > 1e-3


def test_fp16_and_int8_activations_close(hf_models):
    """fp16 activations / accuracy_level 4 are not exact; they stay close (measured ~2e-3 / ~4e-2)."""
    master = master_for(hf_models, "qwen2", 4)
    ids = _ids(VOCAB["qwen2"], seed=6)
    ref = reference_logits(master, ids)
    fp16, _ = _run(_session(build_model(master, dtype="fp16", accuracy_level=1, float_storage="exact")[0]), ids, dtype=np.float16)
    assert rel_err(fp16, ref) < 2e-2
    int8, _ = _run(_session(build_model(master, accuracy_level=4)[0]), ids)
    assert rel_err(int8, ref) < 0.15
    assert (int8.argmax(-1) == ref.argmax(-1)).mean() > 0.7


def test_output_dir_layout_and_metadata(hf_models, tmp_path):
    from gguf_fixtures import build_tokenizer

    n = build_tokenizer(tmp_path / "tok", "qwen2")
    hf = build_hf("qwen2", n, seed=7)
    master = build_master(hf, 3, GROUP, tok_dir=tmp_path / "tok")
    out = tmp_path / "out"
    rep = export_onnx(master, out, accuracy_level=1, float_storage="exact")
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp dir renamed away
    assert all(t.exact for t in rep.tensors) and "3-bit codes in a 4-bit container" in rep.tensors[0].note
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["onnxruntime.min_version"] == "1.28" and meta["opset.ai.onnx"] == "17"
    assert meta["neuqi_export.zero_point"] == "fast" and meta["neuqi_export.accuracy_level"] == "1"
    assert {(o.domain, o.version) for o in m.opset_import} == {("", 17), ("com.microsoft", 1)}
    nb = [nd for nd in m.graph.node if nd.op_type == "MatMulNBits"]
    assert len(nb) == 14 and all(nd.domain == "com.microsoft" for nd in nb)
    assert {a.name: a.i for a in nb[0].attribute}["bits"] == 4
    cfg = json.loads((out / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    assert cfg["model"]["type"] == "qwen2" and dec["num_key_value_heads"] == 2 and dec["head_size"] == 16
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key" and dec["outputs"]["logits"] == "logits"
    with pytest.raises(UserError, match="already exists"):
        export_onnx(master, out)
    export_onnx(master, out, overwrite=True, external_data=True, accuracy_level=1, float_storage="exact")
    assert (out / "model.onnx.data").is_file()
    ids = _ids(n, seed=8)
    assert rel_err(_run(_session(out / "model.onnx"), ids)[0], reference_logits(master, ids)) < 1e-4


def test_bad_inputs(hf_models):
    master = build_master(hf_models["llama"], 4, 8, method="minmax")  # groups of 8 columns: no MatMulNBits block fits
    with pytest.raises(UserError, match="group size 8"):
        build_model(master)
    master = master_for(hf_models, "llama", 4)
    with pytest.raises(UserError, match="dtype"):
        build_model(master, dtype="bf16")
    with pytest.raises(UserError, match="zero-point"):
        build_model(master, zero_point="int")
    cfg = master.config
    master.config = dict(cfg, model_type="gpt2")
    try:
        with pytest.raises(UserError, match="gpt2"):
            build_model(master)
    finally:
        master.config = cfg


def test_registered_and_cli_options():
    import argparse

    from converters.registry import load_all

    exp = load_all()["onnx"]
    p = argparse.ArgumentParser()
    exp.add_arguments(p)
    args = p.parse_args(["--dtype", "fp16", "--zero-point", "float", "--accuracy-level", "1", "--float-storage", "exact"])
    assert (args.onnx_dtype, args.onnx_zero_point, args.onnx_accuracy_level) == ("fp16", "float", 1)
    args = p.parse_args([])
    assert (args.onnx_dtype, args.onnx_zero_point, args.onnx_accuracy_level) == ("fp32", "fast", 4)


def test_cli_export_roundtrip(hf_models, tmp_path):
    """`neuqi-export export MASTER --to onnx` on a saved (and re-loaded) master checkpoint."""
    from neuqi_export.cli import main
    from runtimes.onnxruntime import load

    master = master_for(hf_models, "qwen2", 3)
    master.save(tmp_path / "master")
    out = tmp_path / "onnx"
    assert main(["export", str(tmp_path / "master"), "--to", "onnx", "-o", str(out), "--accuracy-level", "1", "--float-storage", "exact",
                 "--zero-point", "float", "--quiet"]) == 0
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["neuqi_export.zero_point"] == "float" and meta["neuqi_export.dtype"] == "fp32"
    ids = _ids(VOCAB["qwen2"], seed=9)
    assert rel_err(load(out, n_threads=1).logits(ids), reference_logits(master, ids)) < 1e-4
    assert main(["export", str(tmp_path / "master"), "--to", "onnx", "-o", str(out), "--dtype", "fp16"]) == 2  # exists
    assert main(["export", str(tmp_path / "master"), "--to", "onnx", "-o", str(out), "--dtype", "fp16", "--force"]) == 0
    assert load(out).dtype == np.float16


def test_left_padding_mask(hf_models):
    """A left-padded row (attention_mask 0, positions counted from the first real token), as
    onnxruntime-genai feeds batches: its real positions match transformers with the same mask."""
    import torch

    from neuqi_export.modeling import master_to_hf

    master = master_for(hf_models, "qwen2", 4)
    ids = _ids(VOCAB["qwen2"], b=2, L=10, seed=10)
    mask = np.ones((2, 10), np.int64)
    mask[1, :3] = 0
    pos = np.tile(np.arange(10), (2, 1))
    pos[1] = np.maximum(np.arange(10) - 3, 0)
    with torch.no_grad():
        ref = master_to_hf(master)(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                   position_ids=torch.from_numpy(pos)).logits.numpy()
    sess = _session(build_model(master, accuracy_level=1, float_storage="exact")[0])
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    for i in range(2):
        for n in ("key", "value"):
            feed[f"past_key_values.{i}.{n}"] = np.zeros((2, 2, 0, 16), np.float32)
    got = sess.run(["logits"], feed)[0]
    assert rel_err(got[0], ref[0]) < 1e-4 and rel_err(got[1, 3:], ref[1, 3:]) < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied embedding / untied float head
def test_float_weights_stored_in_lossless_half(arch, tmp_path):
    """A bf16 checkpoint's float weights (embedding, float head, norms) go in as BF16 initializers cast to fp32:
    the file shrinks by their half, the logits are the same bits as with --float-storage fp32; weights bf16
    cannot hold stay fp32."""
    hf = build_hf(arch, VOCAB[arch], seed=3)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # a checkpoint that came in bf16, as most do
    master = build_master(hf, 4, GROUP)
    ids = _ids(VOCAB[arch], seed=4)
    runs = {}
    for storage in ("exact", "fp32"):  # (default "half" = exact here: every weight fits bf16)
        out = tmp_path / storage
        rep = export_onnx(master, out, accuracy_level=1, float_storage=storage)
        types = {t.name: t.type for t in rep.tensors if not t.type.startswith("MatMulNBits")}
        runs[storage] = ((out / "model.onnx").stat().st_size, types, _run(_session(out / "model.onnx"), ids)[0])
    (n_exact, types, y_exact), (n_fp32, types32, y_fp32) = runs["exact"], runs["fp32"]
    assert np.array_equal(y_exact, y_fp32)
    assert rel_err(y_exact, reference_logits(master, ids)) < 1e-4
    assert set(types.values()) == {"BF16"} and set(types32.values()) == {"FP32"}, (types, types32)
    float_bytes = sum(master.tensors[n].numel() * 2 for n in types)  # what half storage saves
    assert 0.95 * float_bytes < n_fp32 - n_exact <= float_bytes  # less the Cast nodes' few bytes
    m = onnx.load(str(tmp_path / "exact" / "model.onnx"))
    assert {i.data_type for i in m.graph.initializer if i.name == "model.embed_tokens.weight"} == {onnx.TensorProto.BFLOAT16}
    # a weight bf16 cannot hold but fp16 can is stored fp16; one neither can hold stays fp32
    from converters.onnx.builder import lossless_half

    assert lossless_half(np.array([1.0 + 2 ** -9], np.float32))[0] == onnx.TensorProto.FLOAT16
    assert lossless_half(np.array([1.0 + 2 ** -20], np.float32)) is None


def test_default_half_storage_rounds_fp32_weights_and_says_so(hf_models, tmp_path):
    """Float weights half cannot hold exactly (a random fp32 model's) are rounded to fp16 by default: the report
    marks them not exact, the logits move by what fp16 rounding costs (< 5e-3 rel, measured ~1e-3), and
    --float-storage exact keeps them fp32 and the logits exact."""
    master = master_for(hf_models, "qwen2", 4)
    ids = _ids(VOCAB["qwen2"], seed=5)
    ref = reference_logits(master, ids)
    rep = export_onnx(master, tmp_path / "half", accuracy_level=1)
    floats = {t.name: t for t in rep.tensors if not t.type.startswith("MatMulNBits")}
    emb = floats["model.embed_tokens.weight"]
    assert emb.type == "FP16" and not emb.exact and "--float-storage exact" in emb.note
    err_half = rel_err(_run(_session(tmp_path / "half" / "model.onnx"), ids)[0], ref)
    export_onnx(master, tmp_path / "exact", accuracy_level=1, float_storage="exact")
    err_exact = rel_err(_run(_session(tmp_path / "exact" / "model.onnx"), ids)[0], ref)
    assert err_exact < 1e-4 < err_half < 5e-3, (err_exact, err_half)
    half, exact = ((tmp_path / d / "model.onnx").stat().st_size for d in ("half", "exact"))
    assert half < exact - master.tensors["model.embed_tokens.weight"].numel()  # embedding and head halved at least
