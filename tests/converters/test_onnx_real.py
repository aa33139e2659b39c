"""The real SmolLM2 master exported to ONNX (MatMulNBits) and scored by onnxruntime."""
from converters.onnx.export import export_onnx
from neuqi_export.evaluate import perplexity_from_logits_fn
from neuqi_export.master import MasterCheckpoint


def test_real_onnx_export_scores_like_the_master(real_master_dir, real_master_ppl, real_eval_windows, tmp_path):
    from runtimes.registry import runtime_for

    out = tmp_path / "onnx"
    export_onnx(MasterCheckpoint.load(real_master_dir), out, zero_point="fast", accuracy_level=1, float_storage="exact")
    assert (out / "model.onnx").is_file() and (out / "genai_config.json").is_file()
    scorer = runtime_for(out).load(out)
    ppl = perplexity_from_logits_fn(scorer.logits, real_eval_windows, progress=False)
    assert ppl.tokens == real_master_ppl.tokens
    assert abs(ppl.ppl / real_master_ppl.ppl - 1) < 0.005, (ppl, real_master_ppl)
