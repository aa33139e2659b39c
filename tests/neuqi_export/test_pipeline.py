"""Sequential quantization on tiny random models (fast) — the real model is in test_integration.py."""
import json

import pytest
import torch

from model_factory import families, quantized_linear_names

from neuqi_export import pipeline
from neuqi_export.archs import family_for
from neuqi_export.data import read_text
from neuqi_export.errors import UserError
from neuqi_export.experts import split_expert
from neuqi_export.master import MasterCheckpoint
from neuqi_export.master_store import tensor_digests
from neuqi_export.modeling import load_hf_model, master_to_hf
from neuqi_export.pipeline import QuantizeOptions, quantize_model

OPTS = dict(nsamples=4, seqlen=64)


@pytest.fixture(scope="module")
def calib(real_assets):
    return read_text(real_assets.calib_text)


@pytest.mark.parametrize("model_type", families())
def test_quantize_tiny_model_roundtrips_and_evaluates(model_type, tiny_family_dir, tmp_path, calib):
    model_dir = tiny_family_dir(model_type)
    opts = QuantizeOptions(bits=3, group_size=32, init="neuqi", gptq=True, **OPTS)
    summary = quantize_model(model_dir, tmp_path / "m", opts, calib_text=calib, progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    cfg = json.loads((model_dir / "config.json").read_text())
    assert summary.layers == len(master.linears) == len(quantized_linear_names(cfg))
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
        if family_for(model_type).experts and ".experts." in name:  # an expert's slice of the fused parameters
            base, e, part = name.rsplit(".", 2)
            mod = q.get_submodule(base)
            assert torch.equal(split_expert(mod.gate_up_proj.data, mod.down_proj.data, int(e))[part], lin.dequantize())
            continue
        mod = q.get_submodule(name)
        assert torch.equal(mod.weight.data, lin.dequantize())
        if model_type == "qwen2" and name.endswith("q_proj"):
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
    assert not (tmp_path / "r").exists() and (tmp_path / "r.partial" / "model-00001-of-00003.safetensors").exists()
    monkeypatch.setattr(pipeline, "_quantize_block", real)
    summary = quantize_model(tiny_llama_dir, tmp_path / "r", opts, calib_text=calib, progress=False)
    assert summary.resumed_blocks == 1 and not (tmp_path / "r.partial").exists()
    a, b = MasterCheckpoint.load(tmp_path / "clean"), MasterCheckpoint.load(tmp_path / "r")
    for name in a.linears:
        assert torch.equal(a.linears[name].codes, b.linears[name].codes)
        assert torch.equal(a.linears[name].scale, b.linears[name].scale)


def test_data_free_per_channel(tiny_llama_dir, tmp_path):
    """Every linear: one (scale, zero) per output row, h = 1 (no calibration), 8-bit codes, and the mse init's
    error, pinned to what this seeded model measures."""
    opts = QuantizeOptions(bits=8, group_size=-1, init="mse", calibrate=False)
    quantize_model(tiny_llama_dir, tmp_path / "m", opts, progress=False)
    master = MasterCheckpoint.load(tmp_path / "m")
    orig = load_hf_model(tiny_llama_dir)[0]
    n_layers = json.loads((tiny_llama_dir / "config.json").read_text())["num_hidden_layers"]
    assert len(master.linears) == 7 * n_layers
    err = norm = 0.0
    for name, lin in master.linears.items():
        W = orig.get_submodule(name).weight.detach().double()
        out, inf = W.shape
        assert (lin.bits, lin.group_size, lin.shape) == (8, -1, (out, inf)), name
        assert lin.scale.shape == lin.zero.shape == (out, 1), name
        assert lin.hdiag.shape == (inf,) and torch.all(lin.hdiag == 1), name
        assert int(lin.codes.max()) <= 255, name
        e = float((lin.dequantize().double() - W).pow(2).sum())
        rel = (e / float(W.pow(2).sum())) ** 0.5
        # measured ||W - Wq|| / ||W||: 4.52e-3 .. 5.442089e-3 (layer 0 down_proj) over the 14 linears
        assert rel < 5.442089e-3 * 1.01, (name, rel)
        err, norm = err + e, norm + float(W.pow(2).sum())
    # Measured (this seeded tiny llama, CPU): all linears together ||W - Wq|| / ||W|| = 4.868284e-3, identical with
    # 1 and 2 torch threads and with the code of commit 33f9f8c. Tolerance 1%: the mse init picks each row's scale
    # from a discrete candidate set, so only a float near-tie could move it; min-max rows instead of mse give
    # 5.446127e-3 (+12%, worst linear 5.94e-3), measured on the same model.
    assert (err / norm) ** 0.5 == pytest.approx(4.868284e-3, rel=1e-2)


def _head_inputs(model_dir, master, calib):
    """The lm_head's inputs on the calibration windows, recomputed independently of the pipeline: the original
    model with every body linear replaced by the master's dequantized weights (the embedding stays original, as
    during calibration), a forward hook on lm_head."""
    from neuqi_export.data import calibration_windows

    model, tok, _ = load_hf_model(model_dir)
    with torch.no_grad():
        for name, lin in master.linears.items():
            if name != "lm_head":
                model.get_submodule(name).weight.copy_(lin.dequantize())
    seen = []
    handle = model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for w in calibration_windows(tok, calib, OPTS["nsamples"], OPTS["seqlen"], seed=0):
            model(w[None])
    handle.remove()
    return torch.cat(seen).double(), model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_head(arch, head_master, tiny_llama_dir, tiny_qwen2_dir, calib):
    """--lm-head-bits: the head is a 4-bit record fitted on diag(H) of the final norm's outputs; a tied head is
    the embedding too (not stored twice)."""
    model_dir = {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}[arch]
    path = head_master(arch, 4)
    master = MasterCheckpoint.load(path)
    head, tied = master.linears["lm_head"], arch == "llama"
    assert head.bits == 4 and head.group_size == 32 and int(head.codes.max()) <= 15
    assert master.quantization_config["lm_head"] == {"bits": 4, "tied_embedding": tied}
    assert master.head_shares_embedding == tied and len(master.linears) == 15
    stored = set(tensor_digests(path))
    assert "lm_head.weight" not in stored and "lm_head.qweight" in stored
    assert ("model.embed_tokens.weight" in stored) == (not tied)
    if tied:  # derived on load: the embedding is the quantized head
        assert torch.equal(master.tensors["model.embed_tokens.weight"], head.dequantize())
    # h = diag of the damped H of the head's inputs (final norm of the quantized body), recomputed independently
    X, orig = _head_inputs(model_dir, master, calib)
    h = (X ** 2).mean(0)
    h = h + 0.01 * h.mean()
    torch.testing.assert_close(head.hdiag.double(), h, rtol=2e-4, atol=0)
    # a 4-bit fit (NeUQI + GPTQ) beats plain min-max rounding on the full-H error (measured: 0.57x)
    W = orig.get_output_embeddings().weight.detach().double()
    H = X.T @ X / X.shape[0]
    err = lambda Wq: float(torch.einsum("oi,ij,oj->", W - Wq, H, W - Wq))  # noqa: E731
    from neuqi_export.quant.grid import dequantize, quantize_codes
    from neuqi_export.quant.params import init_params

    s, z = init_params(W.float(), 4, 32, "minmax")
    rtn = dequantize(quantize_codes(W.float(), s, z, 4, 32), s, z, 32).double()
    assert err(head.dequantize().double()) < 0.8 * err(rtn) and err(rtn) < 0.05 * err(torch.zeros_like(W))
    # the master runs in transformers with the quantized head (and, tied, the quantized embedding)
    q = master_to_hf(master)
    assert torch.equal(q.get_output_embeddings().weight.data, head.dequantize())
    assert torch.equal(q.get_input_embeddings().weight.data,
                       head.dequantize() if tied else master.tensors["model.embed_tokens.weight"])


def test_quantized_head_resumes_and_checks_options(tiny_llama_dir, tmp_path, calib, monkeypatch):
    opts = QuantizeOptions(bits=3, group_size=32, gptq=True, lm_head_bits=4, **OPTS)
    real = pipeline.quantize_linear

    def fail_on_head(W, H, o, name=None, *a, **kw):
        if name == "lm_head":
            raise KeyboardInterrupt
        return real(W, H, o, name, *a, **kw)

    monkeypatch.setattr(pipeline, "quantize_linear", fail_on_head)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(tiny_llama_dir, tmp_path / "r", opts, calib_text=calib, progress=False)
    monkeypatch.setattr(pipeline, "quantize_linear", real)
    assert not (tmp_path / "r").exists()
    summary = quantize_model(tiny_llama_dir, tmp_path / "r", opts, calib_text=calib, progress=False)
    assert summary.resumed_blocks == 2 and summary.layers == 15 and "lm_head" in summary.per_layer
    clean = quantize_model(tiny_llama_dir, tmp_path / "c", opts, calib_text=calib, progress=False)
    assert summary.hessian_loss == clean.hessian_loss
    a, b = MasterCheckpoint.load(tmp_path / "r"), MasterCheckpoint.load(tmp_path / "c")
    assert torch.equal(a.linears["lm_head"].codes, b.linears["lm_head"].codes)
    for bad, msg in ((dict(lm_head_bits=5), "--lm-head-bits 5 is not supported"),
                     (dict(lm_head_bits=4, gguf_types={"x": "Q4_K"}), "does not combine with quantizing on a GGUF type")):
        with pytest.raises(UserError, match=msg):
            QuantizeOptions(**bad).validate()
