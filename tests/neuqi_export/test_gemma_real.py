"""The second real model end to end: Gemma-3-270M (fetched from PyPI) quantized by the pipeline (4-bit g128 + GPTQ,
small calibration: conftest's GEMMA_QUANT / GEMMA_EVAL), scored on held-out Wikipedia, and exported to MLX and
compressed-tensors, each run in its runtime against the master. GGUF and ONNX: tests/test_gemma_formats.py."""
import json

import numpy as np
import pytest
import torch

from neuqi_export.evaluate import perplexity_hf
from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import load_hf_model, master_to_hf

pytestmark = pytest.mark.integration

# Measured on this project's 2-core CPU box (GEMMA_EVAL: 4 windows x 256 tokens of eval.txt in Gemma's tokenizer;
# GEMMA_QUANT: 4-bit g128 NeUQI + GPTQ on 8 x 512 calibration tokens): see the asserts' comments.
FP_PPL = 94.231314  # measured twice (perplexity_hf, 1 and 2 processes busy beside it): 94.23131373551286
# 4-bit g128 NeUQI + GPTQ master, dequantized in transformers: 104.234749 (x1.106 of fp32), the same with 1 and 2
# torch threads (AMD EPYC, 2026-12-04). History: on 4 x 256 calibration tokens (fewer than down_proj's 2048 inputs,
# a rank-deficient H) GPTQ's result depended on the CPU: 122.31 on the Intel boxes, 112.02 on this AMD one, from
# byte-identical code and inputs; plain NeUQI there scored 104.55; hence the 8 x 512 calibration now.
# rel 3%: rounding near-ties may flip on another platform; a regression of the pipeline moves it by more.
MASTER_PPL = 104.234749


def _logits_rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got[..., : ref.shape[-1]] - ref).max() / np.abs(ref).max())


def _master_logits(master_dir, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return master_to_hf(MasterCheckpoint.load(master_dir))(torch.from_numpy(ids)).logits.numpy().astype(np.float64)


def _runtime_logits(path, ids: np.ndarray) -> tuple[str, np.ndarray]:
    from runtimes.registry import runtime_for

    rt = runtime_for(path)
    assert rt is not None, path
    return rt.name, np.asarray(rt.load(path).logits(ids), np.float64)


def test_gemma_master_perplexity_is_within_its_band(gemma_dir, gemma_master, gemma_eval_windows):
    master_dir = gemma_master("neuqi")
    master = MasterCheckpoint.load(master_dir)
    cfg = json.loads((gemma_dir / "config.json").read_text())
    assert len(master.linears) == 7 * cfg["num_hidden_layers"]
    assert master.linears["model.layers.0.self_attn.q_proj"].scale.shape == (1024, 5)  # 640 = 5 x 128
    fp = perplexity_hf(load_hf_model(gemma_dir)[0], gemma_eval_windows, progress=False)
    mp = perplexity_hf(master_to_hf(master), gemma_eval_windows, progress=False)
    assert fp.tokens == 4 * 255
    assert fp.ppl == pytest.approx(FP_PPL, rel=1e-4), fp
    assert mp.ppl == pytest.approx(MASTER_PPL, rel=3e-2), (fp, mp)
    assert fp.ppl < mp.ppl < 1.5 * fp.ppl, (fp, mp)


def test_gemma_mlx_export_runs_in_mlx_lm_as_the_master(gemma_master, gemma_eval_windows, tmp_path):
    """mlx-lm's gemma3_text: periodic sliding windows (512, every 6th layer global), bf16-rounded embedding scale
    absorbed by the exporter; on 2 windows of 256 tokens the logits match the master in transformers."""
    from converters.mlx import export_mlx

    master_dir = gemma_master("neuqi")
    ids = gemma_eval_windows[:1].numpy()
    export_mlx(MasterCheckpoint.load(master_dir), tmp_path / "mlx", float_storage="exact")
    runtime, got = _runtime_logits(tmp_path / "mlx", ids)
    ref = _master_logits(master_dir, ids)
    assert runtime == "mlx" and _logits_rel(got, ref) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.99


def test_gemma_compressed_tensors_in_transformers_match_the_master(gemma_master, gemma_eval_windows, tmp_path):
    """Integer zero-points (neuqi_int) are what compressed-tensors holds exactly: the export loaded by transformers
    (compressed-tensors, dequantize=True) gives the master's logits."""
    from converters.compressed_tensors import export_compressed_tensors

    master_dir = gemma_master("neuqi_int")
    ids = gemma_eval_windows[:1].numpy()
    report = export_compressed_tensors(MasterCheckpoint.load(master_dir), tmp_path / "ct", float_storage="exact")
    assert all(t.exact for t in report.tensors)
    runtime, got = _runtime_logits(tmp_path / "ct", ids)
    assert runtime == "transformers" and _logits_rel(got, _master_logits(master_dir, ids)) < 1e-4
