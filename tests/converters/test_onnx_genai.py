"""The exported directory loads in onnxruntime-genai (genai_config.json, tokenizer, model.onnx) and its
greedy search gives the same tokens as the toolkit's onnxruntime runtime and transformers, for every family
onnxruntime-genai has a model type for (the prompt plus 10 new tokens is longer than the sliding windows).
Needs the `onnxruntime-genai` package (in the `onnxruntime` extra)."""
import numpy as np
import pytest
import torch
from model_factory import dense_families

from converters.onnx import export_onnx
from gguf_fixtures import build_tokenizer  # noqa: E402
from neuqi_export.archs import family_for
from onnx_fixtures import build_master, build_model  # noqa: E402

GENAI_FAMILIES = [f for f in dense_families() if family_for(f).genai_type is not None]


def _until_eos(tokens: list, eos: int) -> list:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("model_type", GENAI_FAMILIES)
def test_genai_greedy_matches(model_type, tmp_path):
    import onnxruntime_genai as og

    from neuqi_export.modeling import master_to_hf
    from runtimes.onnxruntime import load

    n = build_tokenizer(tmp_path / "tok", "smollm")
    master = build_master(build_model(model_type, n, seed=6), 4, 64, tok_dir=tmp_path / "tok")
    out = tmp_path / "onnx"
    export_onnx(master, out, accuracy_level=1, float_storage="exact")

    model = og.Model(str(out))
    tok = og.Tokenizer(model)
    prompt = [int(t) for t in tok.encode("the model reads a window of tokens")]
    assert len(prompt) > 3
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 10, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    got = [int(t) for t in gen.get_sequence(0)][len(prompt):]

    eos = master.config["eos_token_id"]
    ours = load(out, n_threads=1).generate(prompt, 10, stop_at_eos=True, eos_token_id=eos)
    with torch.no_grad():
        ref = master_to_hf(master).generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                            pad_token_id=eos)[0, len(prompt):].tolist()
    assert got == ours == _until_eos(ref, eos) and len(got) >= 1
    if model_type == "llama":
        assert len(got) == 10  # (seed 6: no end-of-sequence token in these 10)
