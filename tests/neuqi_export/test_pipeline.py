"""Sequential quantization on tiny random models (fast) — the real model is in test_integration.py."""
import json

import pytest
import torch

from neuqi_export import pipeline
from neuqi_export.data import read_text
from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import load_hf_model, master_to_hf
from neuqi_export.pipeline import QuantizeOptions, quantize_model

OPTS = dict(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def calib(real_assets):
    return read_text(real_assets.calib_text)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir"])
def test_quantize_tiny_model_roundtrips_and_evaluates(fixture, request, tmp_path, calib):
    model_dir = request.getfixturevalue(fixture)
    opts = QuantizeOptions(bits=3, group_size=32, init="neuqi", gptq=True, **OPTS)
    summary = quantize_model(model_dir, tmp_path / "m", opts, calib_text=calib, progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert summary.layers == len(master.linears) == 7 * n_layers
    for name, lin in master.linears.items():
        assert lin.bits == 3 and int(lin.codes.max()) <= 7 and lin.hdiag.min() > 0
    q = master_to_hf(master)
    orig, tok, _ = load_hf_model(model_dir)
    ids = torch.tensor([tok(calib[:400])["input_ids"][:48]])
    with torch.no_grad():
        lq, lo = q(ids).logits, orig(ids).logits
    # a 3-bit model is close to, but not equal to, the original
    assert 0 < (lq - lo).abs().mean() < lo.abs().mean()
    for name, lin in master.linears.items():
        mod = q.get_submodule(name)
        assert torch.equal(mod.weight.data, lin.dequantize())
        if fixture == "tiny_qwen2_dir" and name.endswith("q_proj"):
            assert mod.bias is not None and torch.equal(mod.bias, orig.get_submodule(name).bias)


def test_gptq_beats_rtn_and_neuqi_beats_minmax_on_the_hessian_loss(tiny_llama_dir, tmp_path, calib):
    losses = {}
    for init in ("minmax", "neuqi"):
        for gptq in (False, True):
            opts = QuantizeOptions(bits=2, group_size=32, init=init, gptq=gptq, **OPTS)
            s = quantize_model(tiny_llama_dir, tmp_path / f"{init}{gptq}", opts, calib_text=calib, progress=False)
            losses[init, gptq] = s.hessian_loss
    assert losses["neuqi", False] < losses["minmax", False]
    assert losses["minmax", True] < losses["minmax", False]
    assert losses["neuqi", True] < losses["neuqi", False]


def test_interrupted_run_resumes_to_the_same_checkpoint(tiny_llama_dir, tmp_path, calib, monkeypatch):
    opts = QuantizeOptions(bits=4, group_size=32, init="neuqi", gptq=True, **OPTS)
    quantize_model(tiny_llama_dir, tmp_path / "clean", opts, calib_text=calib, progress=False)

    real = pipeline._quantize_block
    calls = []

    def flaky(block, k, *a, **kw):
        if k == 1:
            raise KeyboardInterrupt
        calls.append(k)
        return real(block, k, *a, **kw)

    monkeypatch.setattr(pipeline, "_quantize_block", flaky)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama_dir, tmp_path / "r", opts, calib_text=calib, progress=False)
    assert not (tmp_path / "r").exists() and (tmp_path / "r.partial" / "block_0000.safetensors").exists()
    monkeypatch.setattr(pipeline, "_quantize_block", real)
    summary = quantize_model(tiny_llama_dir, tmp_path / "r", opts, calib_text=calib, progress=False)
    assert summary.resumed_blocks == 1 and not (tmp_path / "r.partial").exists()
    a, b = MasterCheckpoint.load(tmp_path / "clean"), MasterCheckpoint.load(tmp_path / "r")
    for name in a.linears:
        assert torch.equal(a.linears[name].codes, b.linears[name].codes)
        assert torch.equal(a.linears[name].scale, b.linears[name].scale)


def test_data_free_per_channel(tiny_llama_dir, tmp_path):
    opts = QuantizeOptions(bits=8, group_size=-1, init="mse", calibrate=False)
    quantize_model(tiny_llama_dir, tmp_path / "m", opts, progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    lin = next(iter(master.linears.values()))
    assert lin.scale.shape[1] == 1 and torch.all(lin.hdiag == 1)
