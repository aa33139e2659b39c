"""The real SmolLM2 master exported to GGUF and run by llama.cpp (llama-cpp-python)."""
import numpy as np
import pytest

from converters.gguf import export_gguf
from neuqi_export.evaluate import perplexity_from_logits_fn
from neuqi_export.master import MasterCheckpoint


@pytest.fixture(scope="module")
def real_gguf(real_master_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "smollm2-3bit-q4_1.gguf"
    report = export_gguf(MasterCheckpoint.load(real_master_dir), out, qtype="Q4_1")
    return out, report


def test_real_export_is_exact_and_llamacpp_perplexity_matches(real_gguf, real_master_ppl, real_eval_windows):
    from runtimes.registry import runtime_for

    path, report = real_gguf
    linears = [t for t in report.tensors if t.type == "Q4_1"]
    assert len(linears) == 7 * 30 and all(t.exact for t in linears)
    scorer = runtime_for(path).load(path)
    ppl = perplexity_from_logits_fn(scorer.logits, real_eval_windows, progress=False)
    assert ppl.tokens == real_master_ppl.tokens
    # llama.cpp quantizes activations to 8 bits; the weights are the master's exactly (fp16 d, m)
    assert abs(ppl.ppl / real_master_ppl.ppl - 1) < 0.02, (ppl, real_master_ppl)


def test_real_gguf_greedy_text_is_sensible(real_gguf, real_tokenizer):
    from runtimes.registry import runtime_for

    path, _ = real_gguf
    scorer = runtime_for(path).load(path)
    prompt = real_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    new = scorer.generate(prompt, 16)
    text = real_tokenizer.decode(new)
    words = [w for w in text.split() if w.isalpha()]
    assert len(words) >= 5, text  # real words, not byte soup
    # the continuation is one the model itself finds likely: mean logit rank of the chosen tokens is 0 (greedy)
    full = scorer.logits(np.array([prompt + new]))[0]
    assert all(int(np.argmax(full[len(prompt) - 1 + k])) == new[k] for k in range(4))
