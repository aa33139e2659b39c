"""Gemma-3-270M exported to GGUF and ONNX, each run in its runtime (llama.cpp, onnxruntime) against the master in
transformers (integration: the real model)."""
import numpy as np
import pytest
import torch

from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import master_to_hf

pytestmark = pytest.mark.integration

# the per-runtime tolerances of tests/test_family_matrix.py (llama.cpp quantizes activations to Q8 in its matmuls)
TOL = {"llamacpp": 0.10, "onnxruntime": 1e-4}
# options under which each format holds the master exactly (tools/family_matrix.py EXACT_OPTIONS)
EXACT = {"gguf": {"embed_type": "F32", "output_type": "F32"}, "onnx": {"accuracy_level": 1, "float_storage": "exact"},
         "mlx": {"float_storage": "exact"}, "compressed-tensors": {"float_storage": "exact"}}


def _export(fmt, master_dir, out, **options):
    from converters.registry import load_all

    return load_all()[fmt].export(master_dir, out, **options)


def _logits(report, ids):
    from runtimes.registry import runtime_for

    rt = runtime_for(report.path)
    return rt.name, np.asarray(rt.load(report.path).logits(ids), np.float64)


def _master_logits(master_dir, ids):
    with torch.no_grad():
        return master_to_hf(MasterCheckpoint.load(master_dir))(torch.from_numpy(ids)).logits.numpy().astype(np.float64)


def _rel(got, ref):
    return float(np.abs(got[..., : ref.shape[-1]] - ref).max() / np.abs(ref).max())


def test_gemma_onnx_runs_in_onnxruntime_as_the_master(gemma_master, gemma_eval_windows, tmp_path):
    master_dir = gemma_master("neuqi")
    report = _export("onnx", master_dir, tmp_path / "gemma.onnx", **EXACT["onnx"])
    assert all(t.exact for t in report.tensors), [t.name for t in report.tensors if not t.exact]
    ids = gemma_eval_windows[:1].numpy()  # 256 tokens
    name, got = _logits(report, ids)
    ref = _master_logits(master_dir, ids)
    assert name == "onnxruntime" and _rel(got, ref) < TOL[name]
    assert (got[..., : ref.shape[-1]].argmax(-1) == ref.argmax(-1)).mean() >= 0.99


def test_gemma_gguf_runs_in_llamacpp_as_the_master(gemma_master, gemma_eval_windows, tmp_path):
    """The exact Q4_1 file holds the master's weights bit for bit, but llama.cpp multiplies Q4_1 weights with
    activations it rounds to Q8_1 per 32 values, and Gemma-3's activations have outliers: measured on a 4-bit
    g128 minmax master of Gemma-3-270M, logits max rel 0.29 (mean 0.04) against the master in float, perplexity
    +0.37% (168.46 -> 169.09, 8 x 256 tokens); on this test's former NeUQI + GPTQ master +1.7% (122.31 -> 124.39, 4 x 256 calibration tokens; the fixture now
    uses 8 x 512).
    So the architecture is checked on the F16 export (no activation rounding: max rel 0.0046 measured) and the exact
    file by its perplexity, within 3%."""
    from neuqi_export.evaluate import perplexity_from_logits_fn, perplexity_hf

    master_dir = gemma_master("neuqi")
    ids = gemma_eval_windows[:1].numpy()
    ref = _master_logits(master_dir, ids)
    f16 = _export("gguf", master_dir, tmp_path / "gemma-f16.gguf", qtype="F16", **EXACT["gguf"])
    name, got = _logits(f16, ids)
    assert name == "llamacpp" and _rel(got, ref) < 0.02
    exact = _export("gguf", master_dir, tmp_path / "gemma.gguf", **EXACT["gguf"])
    assert all(t.exact for t in exact.tensors), [t.name for t in exact.tensors if not t.exact]
    from runtimes.registry import runtime_for

    ppl = perplexity_from_logits_fn(runtime_for(exact.path).load(exact.path).logits, gemma_eval_windows, progress=False).ppl
    with torch.no_grad():
        want = perplexity_hf(master_to_hf(MasterCheckpoint.load(master_dir)), gemma_eval_windows, progress=False).ppl
    assert abs(ppl / want - 1) < 0.03, (ppl, want)
