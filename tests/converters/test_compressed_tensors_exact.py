"""compressed-tensors exact by default: `convert --to compressed-tensors` quantizes with integer zero-points
(neuqi_int), so the weights compressed-tensors' own unpacker reads from the file equal the master's dequantized
weights bit for bit; `export` of a float-zero-point master warns once, with the refit error it measured and the
exact route; `--float-storage` stores the float tensors in the model's dtype (half) or exactly."""
import json
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open

from neuqi_export.cli import main


def _ct_weights(path, names, bits):
    """{linear: float64 weight} from the file, through compressed-tensors' own unpack_from_int32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    out = {}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        for name in names:
            out_f, inp = f.get_tensor(f"{name}.weight_shape").tolist()
            s = f.get_tensor(f"{name}.weight_scale")
            g = inp // s.shape[1]
            q = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), bits, torch.Size([out_f, inp])).double()
            z = unpack_from_int32(f.get_tensor(f"{name}.weight_zero_point"), bits, torch.Size([out_f, s.shape[1]]),
                                  packed_dim=0).double()
            out[name] = s.double().repeat_interleave(g, 1) * (q - z.repeat_interleave(g, 1))
    return out


def test_convert_default_is_exact_bit_for_bit(tiny_llama_dir, real_assets, tmp_path, capsys):
    from neuqi_export.master import MasterCheckpoint

    q = ["--bits", "3", "--group-size", "32", "--gptq", "--calib", str(real_assets.calib_text), "--nsamples", "2",
         "--seqlen", "64", "--quiet"]
    assert main(["convert", str(tiny_llama_dir), "--to", "compressed-tensors", "-o", str(tmp_path / "ct"), *q]) == 0
    out = capsys.readouterr().out
    assert "compressed-tensors: quantizing with --init neuqi_int" in out and "warning" not in out
    assert not re.search(r"refit model\.layers\.\d+\.\w+\.\w+_proj:", out), out  # no linear refit
    # the same quantization as a master (deterministic): what convert exported
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "m"), "--init", "neuqi_int", *q]) == 0
    master = MasterCheckpoint.load(tmp_path / "m")
    got = _ct_weights(tmp_path / "ct", list(master.linears), 3)
    for name, lin in master.linears.items():
        want = lin.scale.double().repeat_interleave(32, 1) * (lin.codes.double() - lin.zero.double().repeat_interleave(32, 1))
        assert torch.equal(got[name], want), name


def test_export_of_a_float_zero_master_warns_once_with_the_error(tiny_llama_dir, real_assets, tmp_path, capsys):
    q = ["--bits", "3", "--group-size", "32", "--calib", str(real_assets.calib_text), "--nsamples", "2",
         "--seqlen", "64", "--quiet"]
    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "m"), *q]) == 0  # --init neuqi: float Z
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--to", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    out = capsys.readouterr().out
    found = re.findall(r"warning: .*refit in (\d+) linears \(added diag-H weighted weight error: mean ([0-9.e+-]+), "
                       r"max ([0-9.e+-]+); .*--init neuqi_int", out)
    assert len(found) == 1 and out.count("warning:") == 1, out
    n, mean, mx = found[0]
    assert int(n) == 14 and 0 < float(mean) <= float(mx) < 1


@pytest.fixture(scope="module")
def int_master():
    from fixture_modules import converter_fixtures

    fx = converter_fixtures("onnx_fixtures")
    master = fx.build_master(fx.build_model("qwen2", 300, seed=8), 4, 64, method="neuqi_int")
    return master, fx


def test_float_storage_half_is_the_model_dtype_and_exact_stays_exact(int_master, tmp_path):
    from converters.compressed_tensors import export_compressed_tensors
    from runtimes.transformers import load

    master, fx = int_master
    cfg = {**master.config, "torch_dtype": "bfloat16"}
    bf = type(master)(config=cfg, linears=master.linears, tokenizer_dir=None,
                      tensors={k: v.to(torch.bfloat16).float() for k, v in master.tensors.items()})
    half = export_compressed_tensors(bf, tmp_path / "half")
    assert all(t.exact for t in half.tensors)  # bf16 values in bf16, integer zero-points: exact
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16  # qwen2: untied float head
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight_scale").dtype == torch.float32
    ids = np.random.default_rng(3).integers(0, 300, (2, 9))
    assert fx.rel_err(load(tmp_path / "half", device="cpu", n_threads=1).logits(ids), fx.reference_logits(bf, ids)) < 1e-4

    # a float32 checkpoint's values: half rounds them to float16 (reported), exact keeps them float32
    rounded = export_compressed_tensors(master, tmp_path / "r")
    assert {t.name for t in rounded.tensors if not t.exact} == set(master.tensors)
    exact = export_compressed_tensors(master, tmp_path / "e", float_storage="exact")
    assert all(t.exact for t in exact.tensors) and rounded.bytes < exact.bytes
    assert fx.rel_err(load(tmp_path / "e", device="cpu", n_threads=1).logits(ids), fx.reference_logits(master, ids)) < 1e-4
    cfg_json = json.loads((tmp_path / "e" / "config.json").read_text())
    assert cfg_json["quantization_config"]["format"] == "pack-quantized"
