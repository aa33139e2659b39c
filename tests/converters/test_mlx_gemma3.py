"""gemma3_text in mlx-lm: the exporter maps Family.layer_attention to mlx-lm's periodic keys (sliding_window,
sliding_window_pattern, rope_local_base_freq, rope_theta, query_pre_attn_scalar) and absorbs mlx-lm's bf16-rounded
embedding scale in the residual-branch norms; the export then runs in mlx-lm as the master does in transformers.
The family matrix's tiny gemma3 sets final_logit_softcapping, which mlx-lm's gemma3_text ignores: that one is
refused (tests/test_family_matrix.py); here the same family without it."""
import sys
from pathlib import Path

import pytest
import torch

from converters.mlx import check_family, embed_scale_factor, export_mlx
from neuqi_export.errors import UserError
from neuqi_export.master import MasterCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import family_matrix as fm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _master(tmp_path: Path, hidden: int, **knobs) -> Path:
    from gguf_fixtures import build_tokenizer, corpus
    from model_factory import build_model
    from transformers import AutoTokenizer

    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    build_tokenizer(tmp_path / "tok", "smollm")
    tok_dir = tmp_path / "tok"
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    src = tmp_path / "float"
    model = build_model("gemma3_text", len(tok), seed=4, hidden=hidden, final_logit_softcapping=None, **knobs)
    model.save_pretrained(str(src))
    tok.save_pretrained(str(src))
    out = tmp_path / "master"
    quantize_model(src, out, QuantizeOptions(bits=3, group_size=16, init="neuqi", gptq=True, nsamples=4, seqlen=64),
                   calib_text="\n\n".join(corpus(400, seed=3)), progress=False)
    return out


@pytest.mark.parametrize("hidden", [64, 48])  # sqrt(64) = 8 is a bf16 number; sqrt(48) = 6.928 rounds to 6.9375
def test_gemma3_mlx_matches_the_master_in_mlx_lm(tmp_path, hidden):
    import json

    master = _master(tmp_path, hidden)
    cfg = json.loads((master / "config.json").read_text())
    assert (embed_scale_factor(cfg) == 1.0) == (hidden == 64)
    ids = fm.windows(cfg["vocab_size"])  # 2 x 32 tokens: 4x the sliding window of 8
    ref = fm.reference_logits(master, ids)
    export_mlx(MasterCheckpoint.load(master), tmp_path / "mlx", float_storage="exact")
    mcfg = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert (mcfg["sliding_window"], mcfg["sliding_window_pattern"]) == (8, 3)
    assert (mcfg["rope_local_base_freq"], mcfg["rope_theta"], mcfg["rope_scaling"]) == (1e4, 1e6, None)
    assert mcfg["query_pre_attn_scalar"] == pytest.approx(24) and "rope_parameters" not in mcfg
    runtime, got = fm.runtime_logits(tmp_path / "mlx", ids)
    rel = abs(got[..., : ref.shape[-1]] - ref).max() / abs(ref).max()
    assert runtime == "mlx" and rel < 1e-4, rel


def test_without_the_compensation_the_bf16_scale_shows(tmp_path, monkeypatch):
    # the norm rescaling is what makes hidden 48 exact: without it mlx-lm differs by far more than 1e-4
    import json

    import converters.mlx as M
    from neuqi_export.master import MasterCheckpoint

    master = _master(tmp_path, 48)
    ids = fm.windows(json.loads((master / "config.json").read_text())["vocab_size"])
    ref = fm.reference_logits(master, ids)
    monkeypatch.setattr(M, "compensate_embed_scale", lambda tensors, cfg: None)
    export_mlx(MasterCheckpoint.load(master), tmp_path / "mlx", float_storage="exact")
    got = fm.runtime_logits(tmp_path / "mlx", ids)[1]
    assert abs(got[..., : ref.shape[-1]] - ref).max() / abs(ref).max() > 1e-3


def _cfg(**over):
    from model_factory import tiny_config

    return {**tiny_config("gemma3_text", 300, final_logit_softcapping=None).to_dict(), **over}


@pytest.mark.parametrize("over, says", [
    (dict(final_logit_softcapping=8.0), "applies no logit soft-capping .*final_logit_softcapping 8"),
    (dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
     r"every sliding_window_pattern layers, but this model's are layers \[1, 2\]"),
    (dict(layer_types=["sliding_attention"] * 3), "needs a full-attention layer"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                           "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}),
     "only default and linear rope scaling .*'yarn'"),
])
def test_what_mlx_lm_cannot_run_is_refused_in_one_line(over, says):
    with pytest.raises(UserError, match=says) as e:
        check_family(_cfg(**over))
    assert "\n" not in str(e.value) and "export gguf or onnx instead" in str(e.value)


def test_a_real_gemma3_layout_maps():
    from converters.mlx import _pattern_fields
    from neuqi_export.archs import family_for

    types = (["sliding_attention"] * 5 + ["full_attention"]) * 3
    cfg = _cfg(num_hidden_layers=18, layer_types=types, sliding_window=512, query_pre_attn_scalar=256, hidden_size=640)
    check_family(cfg)
    f = _pattern_fields(cfg, family_for(cfg))
    assert (f["sliding_window"], f["sliding_window_pattern"], f["query_pre_attn_scalar"]) == (512, 6, 256.0)
    assert embed_scale_factor(cfg) == pytest.approx(25.25 / 640 ** 0.5)  # bf16(sqrt(640)) = 25.25
    assert torch.tensor(640 ** 0.5, dtype=torch.bfloat16).item() == 25.25
