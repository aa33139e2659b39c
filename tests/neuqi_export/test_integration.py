"""The real model end to end: SmolLM2-135M quantized by the pipeline and scored on held-out Wikipedia."""
import json

import pytest
import torch

from neuqi_export.cli import main
from neuqi_export.evaluate import perplexity_hf
from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import load_hf_model


def test_real_master_is_complete_and_close_to_the_original(real_assets, real_master_dir, real_master_ppl,
                                                           real_eval_windows):
    master = MasterCheckpoint.load(real_master_dir)
    cfg = json.loads((real_assets.model_dir / "config.json").read_text())
    assert len(master.linears) == 7 * cfg["num_hidden_layers"]
    q = master.linears["model.layers.0.self_attn.q_proj"]
    assert q.scale.shape == (576, 5)  # 576 = 4 × 128 + a ragged group of 64
    assert (real_master_dir / "tokenizer.json").is_file()
    fp = perplexity_hf(load_hf_model(real_assets.model_dir)[0], real_eval_windows, progress=False)
    # Measured (conftest's REAL_QUANT / REAL_EVAL: 3-bit g128 NeUQI + GPTQ on 8 calibration windows x 256 tokens,
    # 8 eval windows x 256 tokens, CPU): fp32 ppl 25.690573, master ppl 48.946262 (x1.905), identical to the last
    # digit with 1 and 2 torch threads and with the code of commit 33f9f8c.
    # fp32: rel 1e-4. Float32 summation order (CPU, torch build) should move it by ~1e-6 (not measured across
    # machines); a change in the scoring moves it by far more (one token fewer per window, the first or the last:
    # +1.1% / +0.5%, measured).
    # master: rel 1%. Its rounding decisions may flip on float near-ties on another platform; 1% is still below every
    # regression measured on this setup (GPTQ off: 50.23, +2.6%; neuqi_int init: 50.59, +3.4%; minmax: 84.28, +72%).
    assert fp.ppl == pytest.approx(25.690573, rel=1e-4), fp
    assert real_master_ppl.ppl == pytest.approx(48.946262, rel=1e-2), (fp, real_master_ppl)
    assert fp.ppl < real_master_ppl.ppl


def test_cli_eval_of_the_real_master(real_master_dir, real_master_ppl, capsys):
    code = main(["eval", str(real_master_dir), "--seqlen", "256", "--max-windows", "8", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and "8 windows × 256" in out
    assert f"ppl {real_master_ppl.ppl:.2f}" in out
