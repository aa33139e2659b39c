"""MLX exporter: packing bit-exact against mlx.core.dequantize, exact re-expression of ragged / per-channel
groups on MLX group sizes, config fields mlx-lm needs, tiny llama / qwen2 logits in mlx-lm equal to
master_to_hf, and the real SmolLM2 master's perplexity in mlx-lm."""
import json

import numpy as np
import pytest
import torch

from neuqi_export.errors import UserError
from fixture_modules import converter_fixtures


def _fixtures():
    return converter_fixtures("onnx_fixtures")


def _lin(out, inp, bits, gs, seed=0):
    from neuqi_export.master import QuantizedLinear
    from neuqi_export.quant.grid import n_groups

    g = torch.Generator().manual_seed(seed)
    ng = n_groups(inp, gs)
    return QuantizedLinear(codes=torch.randint(0, 1 << bits, (out, inp), generator=g, dtype=torch.uint8),
                           scale=torch.rand(out, ng, generator=g) * 0.1 + 1e-3,
                           zero=torch.rand(out, ng, generator=g) * ((1 << bits) - 1) * 1.2 - 0.1,
                           bits=bits, group_size=gs)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_pack_bit_exact_vs_mlx_dequantize(bits, gs):
    import mlx.core as mx

    from converters.mlx import pack_mlx, unpack_mlx

    rng = np.random.default_rng(bits * 1000 + gs)
    codes = rng.integers(0, 1 << bits, (5, 256), dtype=np.uint8)
    packed = pack_mlx(codes, bits)
    assert packed.dtype == np.uint32 and packed.shape == (5, 256 * bits // 32)
    s = rng.random((5, 256 // gs), dtype=np.float32) + 0.5
    b = rng.standard_normal((5, 256 // gs)).astype(np.float32)
    got = np.array(mx.dequantize(mx.array(packed), mx.array(s), mx.array(b), group_size=gs, bits=bits))
    want = np.repeat(s, gs, 1) * codes.astype(np.float32) + np.repeat(b, gs, 1)
    assert np.array_equal(got, want)
    assert np.array_equal(unpack_mlx(packed, bits, 256), codes)
    # and mlx's own quantizer packs the same way
    wq, sq, bq = mx.quantize(mx.array(want), group_size=gs, bits=bits)
    q = unpack_mlx(np.array(wq), bits, 256)
    assert np.array_equal(np.array(mx.dequantize(wq, sq, bq, group_size=gs, bits=bits)),
                          np.repeat(np.array(sq), gs, 1) * q + np.repeat(np.array(bq), gs, 1))


@pytest.mark.parametrize("inp,gs,want_g", [(576, 128, 64), (576, -1, 64), (256, -1, 128), (160, 64, 32), (384, 128, 128)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_regroup_exact(inp, gs, want_g, bits):
    """A ragged last group (576 = 4*128 + 64) / per-channel re-expressed on MLX groups: same weights."""
    import mlx.core as mx

    from converters.mlx import mlx_group_size, mlx_params, pack_mlx

    lin = _lin(6, inp, bits, gs, seed=inp + bits)
    g = mlx_group_size(inp, gs)
    assert g == want_g
    s, b = mlx_params(lin, g)
    got = np.array(mx.dequantize(mx.array(pack_mlx(lin.codes.numpy(), bits)), mx.array(s.numpy()), mx.array(b.numpy()),
                                 group_size=g, bits=bits))
    ref = lin.dequantize().numpy()
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_group_and_bits_fallbacks():
    from converters.mlx import mlx_bits, mlx_group_size

    assert mlx_group_size(100, -1) is None and mlx_group_size(256, 16) is None
    assert mlx_bits(1) == 2 and mlx_bits(7) == 8 and mlx_bits(3) == 3


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory, real_tokenizer):
    from converters.mlx import export_mlx

    fx = _fixtures()
    tmp = tmp_path_factory.mktemp("mlx")
    tok = tmp / "tok"
    real_tokenizer.save_pretrained(str(tok))
    out = {}
    for arch, bits, gs, seed in (("llama", 3, 64, 0), ("qwen2", 4, 128, 1)):
        master = fx.build_master(fx.build_model(arch, len(real_tokenizer), seed=seed), bits, gs, tok_dir=tok)
        path = tmp / arch
        report = export_mlx(master, path, float_storage="exact")
        out[arch] = (path, master, report)
    return out, fx


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_logits_match_master(tiny_exports, arch):
    from runtimes.mlx import load

    exports, fx = tiny_exports
    path, master, report = exports[arch]
    assert all(t.exact for t in report.tensors)
    sc = load(path)
    ids = np.random.default_rng(1).integers(0, master.config["vocab_size"], (2, 11))
    got = sc.logits(ids)
    assert got.dtype == np.float32 and got.shape == (2, 11, master.config["vocab_size"])
    assert fx.rel_err(got, fx.reference_logits(master, ids)) < 1e-4


def test_tiny_config_and_mlx_lm_load(tiny_exports):
    import mlx_lm

    exports, _ = tiny_exports
    for arch, (path, master, _) in exports.items():
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is (arch == "llama")
        assert "rope_parameters" not in cfg and cfg["rope_theta"] == master.config["rope_parameters"]["rope_theta"]
        assert cfg["quantization"]["mode"] == "affine" and "quant_method" not in cfg["quantization"]
        assert "quant_method" not in cfg["quantization_config"]
        # in=160 with master groups of 64 / 128: down_proj goes on MLX groups of 32 (a per-module override)
        assert cfg["quantization"]["group_size"] == 64 if arch == "llama" else 128
        assert cfg["quantization"]["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": cfg["quantization"]["bits"], "mode": "affine"}
        model, tokenizer = mlx_lm.load(str(path))  # the plain mlx-lm entry point, tokenizer included
        assert tokenizer.encode("hello world")


def test_tying_without_the_config_field_comes_from_the_master(tiny_exports):
    """A config without tie_word_embeddings: tied exactly when the master stores no head (no transformers asked)."""
    import copy

    from converters.mlx import mlx_config

    exports, _ = tiny_exports
    for arch, (_, master, _) in exports.items():
        m = copy.copy(master)
        m.config = {k: v for k, v in master.config.items() if k != "tie_word_embeddings"}
        assert mlx_config(m, {})["tie_word_embeddings"] is (arch == "llama") is ("lm_head.weight" not in m.tensors)


def test_generate_matches_transformers(tiny_exports):
    from neuqi_export.modeling import master_to_hf
    from runtimes.mlx import load

    exports, fx = tiny_exports
    path, master, _ = exports["qwen2"]
    prompt = [5, 17, 230, 99]
    new = load(path).generate(prompt, 10)
    with fx.one_torch_thread(), torch.no_grad():
        ref = master_to_hf(master).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                            pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert new == ref


def test_fp16_scales_report_error(tiny_exports, tmp_path):
    from converters.mlx import export_mlx

    exports, _ = tiny_exports
    _, master, _ = exports["llama"]
    report = export_mlx(master, tmp_path / "fp16", scale_dtype="fp16", float_storage="exact")
    assert report.tensors and all("fp16 scales" in t.note and not t.exact and t.added_error > 0 for t in report.tensors)
    with pytest.raises(UserError, match="already exists"):
        export_mlx(master, tmp_path / "fp16")
    with pytest.raises(UserError, match="mlx-scale-dtype"):
        export_mlx(master, tmp_path / "x", scale_dtype="int4")


def test_registered_and_detected(tiny_exports, tmp_path):
    from converters.registry import load_all as exporters
    from runtimes.registry import load_all, runtime_for

    exports, _ = tiny_exports
    assert "mlx" in exporters()
    assert "mlx" in load_all() and runtime_for(exports["llama"][0]).name == "mlx"
    assert not load_all()["mlx"].detects(tmp_path)


def test_real_master_ppl(real_master_dir, real_eval_windows, tmp_path):
    """The real 3-bit master in mlx-lm scores within 0.5% of its own dequantized perplexity. MLX's Linux CPU
    backend is slow (~0.4 GFLOP/s matmuls measured here, no BLAS), so this scores 2 of the shared windows
    (512 tokens) against the master on the same two."""
    import time

    from converters.mlx import export_mlx
    from neuqi_export.evaluate import perplexity_from_logits_fn, perplexity_hf
    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.modeling import master_to_hf
    from runtimes.mlx import load

    windows = real_eval_windows[:2]
    master = MasterCheckpoint.load(real_master_dir)
    ref = perplexity_hf(master_to_hf(master), windows, progress=False)
    report = export_mlx(master, tmp_path / "smol-mlx", float_storage="exact")
    assert all(t.exact for t in report.tensors)
    sc = load(tmp_path / "smol-mlx")
    got = perplexity_from_logits_fn(sc.logits, windows, progress=False, batch_size=2)
    t0 = time.perf_counter()
    new = sc.generate(windows[0, :16].tolist(), 8)
    dt = time.perf_counter() - t0
    assert len(new) == 8
    print(f"mlx {got} vs master {ref}; greedy 16+8 tokens: {8 / dt:.1f} tok/s (incl. prefill)")
    assert abs(got.ppl / ref.ppl - 1) < 0.005


def test_cli_export_and_eval_runtime(tiny_exports, tmp_path):
    """`neuqi-export export MASTER --to mlx` and `--to compressed-tensors` through the CLI."""
    from neuqi_export.cli import main

    exports, _ = tiny_exports
    _, master, _ = exports["llama"]
    master.save(tmp_path / "master")
    assert main(["export", str(tmp_path / "master"), "--to", "mlx", "-o", str(tmp_path / "m"), "--mlx-scale-dtype", "fp16"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]["bits"] == 3
    assert main(["export", str(tmp_path / "master"), "--to", "compressed-tensors", "-o", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
