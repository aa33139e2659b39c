"""MLX `--float-storage`: half (default) writes the float weights and scales/biases in the model's half dtype as
mlx-lm does, loads in plain mlx-lm (computing in that half dtype) and in the mlx runtime, and the runtime's logits
are those of the file's own values (dequantized here independently, in float64, through transformers); `exact`
keeps every tensor exact."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from fixture_modules import converter_fixtures


def _fixtures():
    return converter_fixtures("onnx_fixtures")


@pytest.fixture(scope="module")
def bf16_master(tmp_path_factory, real_tokenizer):
    """A tiny llama master as quantize writes one from a bf16 checkpoint: config dtype bfloat16, its float
    tensors bf16 values held in float32."""
    fx = _fixtures()
    tok = tmp_path_factory.mktemp("tok")
    real_tokenizer.save_pretrained(str(tok))
    master = fx.build_master(fx.build_model("llama", len(real_tokenizer), seed=3), 3, 64, tok_dir=tok)
    master.config["torch_dtype"] = "bfloat16"
    master.tensors = {k: v.to(torch.bfloat16).float() for k, v in master.tensors.items()}
    return master, fx


def _file_values(path: Path, master) -> dict:
    """The MLX file's weights dequantized in float64 by this test's own reader (unpack_mlx, scales * q + biases),
    under the master's (HF) names."""
    from converters.mlx import unpack_mlx

    quant = json.loads((path / "config.json").read_text())["quantization"]
    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        for k in keys:
            if k.endswith((".scales", ".biases")):
                continue
            t = f.get_tensor(k)
            mod = k[: -len(".weight")]
            if f"{mod}.scales" in keys:
                q = quant.get(mod, quant)
                bits, gs = q["bits"], q["group_size"]
                n = t.shape[-1] * 32 // bits
                codes = torch.from_numpy(unpack_mlx(t.numpy(), bits, n).astype(np.int64)).double()
                s = f.get_tensor(f"{mod}.scales").double().repeat_interleave(gs, -1)
                b = f.get_tensor(f"{mod}.biases").double().repeat_interleave(gs, -1)
                out[k] = s * codes + b
            else:
                out[k] = t.double()
    if master.config.get("tie_word_embeddings") and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _logits_of(values: dict, master, ids) -> np.ndarray:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in master.config.items() if k not in ("quantization_config", "torch_dtype")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float64)
    model.load_state_dict(values, strict=False)
    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def test_half_default_dtypes_report_and_runtimes(bf16_master, tmp_path):
    import mlx.core as mx
    import mlx_lm

    from converters.mlx import export_mlx
    from runtimes.mlx import load

    master, fx = bf16_master
    rep = export_mlx(master, tmp_path / "half")
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {dtypes[k] for k in dtypes if k.endswith((".scales", ".biases"))} == {torch.bfloat16}
    assert dtypes["model.embed_tokens.weight"] == dtypes["model.norm.weight"] == torch.bfloat16
    # the bf16 float weights are exact in bf16; each linear's rounded scales/biases are reported with their error
    assert sorted(t.name for t in rep.tensors if not t.exact) == sorted(master.linears)
    assert all(t.added_error > 0 and "bf16 scales/biases" in t.note for t in rep.tensors if not t.exact)

    ids = np.random.default_rng(4).integers(0, master.config["vocab_size"], (2, 12))
    ref = fx.reference_logits(master, ids)
    stored = _logits_of(_file_values(tmp_path / "half", master), master, ids)  # the file's values, float64
    got = load(tmp_path / "half").logits(ids)  # the runtime: the stored values computed in fp32
    assert fx.rel_err(got, stored) < 1e-4
    # what the bf16 scales/biases add (measured 2.2e-2 max |d logit| / max |logit| for this tiny random model: its
    # weights, unlike a trained model's, make the logits a sum of many equal-sized terms; SmolLM2: docs/SIZES.md)
    assert 1e-5 < fx.rel_err(got, ref) < 5e-2, fx.rel_err(got, ref)

    model, _ = mlx_lm.load(str(tmp_path / "half"))  # plain mlx-lm: computes in the stored bf16
    native = np.array(model(mx.array(ids.astype(np.int32))).astype(mx.float32))
    assert fx.rel_err(native, ref) < 1e-1, fx.rel_err(native, ref)


def test_exact_keeps_every_tensor_exact_and_is_larger(bf16_master, tmp_path):
    from converters.mlx import export_mlx
    from runtimes.mlx import load

    master, fx = bf16_master
    half = export_mlx(master, tmp_path / "half")
    exact = export_mlx(master, tmp_path / "exact", float_storage="exact")
    fp32 = export_mlx(master, tmp_path / "fp32", float_storage="fp32")
    assert all(t.exact for t in exact.tensors) and all(t.exact for t in fp32.tensors)
    with safe_open(str(tmp_path / "exact" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_proj.scales").dtype == torch.float32
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16  # lossless: kept half
    with safe_open(str(tmp_path / "fp32" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert half.bytes < exact.bytes < fp32.bytes
    ids = np.random.default_rng(5).integers(0, master.config["vocab_size"], (1, 10))
    assert fx.rel_err(load(tmp_path / "exact").logits(ids), fx.reference_logits(master, ids)) < 1e-4


def test_fp32_checkpoint_rounds_to_fp16_and_exact_keeps_fp32(bf16_master, tmp_path):
    """A float32 checkpoint (values not bf16): half stores float16 (rounded, reported), exact keeps float32."""
    from converters.mlx import export_mlx

    master, _ = bf16_master
    master = type(master)(config={**master.config, "torch_dtype": "float32"}, linears=master.linears,
                          tensors={k: v + 1e-4 * torch.rand_like(v) for k, v in master.tensors.items()},
                          tokenizer_dir=master.tokenizer_dir)
    half = export_mlx(master, tmp_path / "h")
    rounded = {t.name for t in half.tensors if not t.exact and t.name in master.tensors}
    assert rounded == set(master.tensors) and all("rounded to F16" in t.note for t in half.tensors if t.name in rounded)
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    exact = export_mlx(master, tmp_path / "e", float_storage="exact")
    assert all(t.exact for t in exact.tensors)
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
