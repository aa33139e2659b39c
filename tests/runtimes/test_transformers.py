"""transformers runtime: a master checkpoint directory, a GGUF (F32 linears) and detection."""

import numpy as np
import pytest
import torch

from neuqi_export.errors import UserError
from fixture_modules import converter_fixtures


def _fixtures():
    return converter_fixtures("onnx_fixtures")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, real_tokenizer):
    fx = _fixtures()
    tmp = tmp_path_factory.mktemp("tfrt")
    tok = tmp / "tok"
    real_tokenizer.save_pretrained(str(tok))
    master = fx.build_master(fx.build_model("llama", len(real_tokenizer), seed=4), 4, 64, tok_dir=tok)
    master.save(tmp / "master")
    return tmp, master, fx


def test_master_logits_generate_and_detect(saved):
    from neuqi_export.modeling import master_to_hf
    from runtimes.registry import load_all, runtime_for
    from runtimes.transformers import load

    tmp, master, fx = saved
    assert "transformers" in load_all() and runtime_for(tmp / "master").name == "transformers"
    assert not load_all()["transformers"].detects(tmp / "tok")
    sc = load(tmp / "master", device="cpu", n_threads=1)
    ids = np.random.default_rng(0).integers(0, master.config["vocab_size"], (2, 8))
    got = sc.logits(ids)
    assert got.dtype == np.float32 and fx.rel_err(got, fx.reference_logits(master, ids)) < 1e-5
    prompt = [5, 17, 230, 99]
    with torch.no_grad():
        ref = master_to_hf(master).generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                            pad_token_id=0, eos_token_id=None)[0, 4:].tolist()
    assert sc.generate(prompt, 6) == ref
    with pytest.raises(UserError, match="token id"):
        sc.logits(np.array([[0, master.config["vocab_size"]]]))


def test_gguf(saved):
    from converters.gguf import export_gguf
    from runtimes.transformers import load

    tmp, master, fx = saved
    export_gguf(master, tmp / "m.gguf", qtype="F32", embed_type="F32", output_type="F32")
    sc = load(tmp / "m.gguf", device="cpu", n_threads=1)
    assert sc.kind == "gguf"
    ids = np.random.default_rng(1).integers(0, master.config["vocab_size"], (1, 8))
    assert fx.rel_err(sc.logits(ids), fx.reference_logits(master, ids)) < 1e-4


def test_errors(tmp_path):
    from runtimes.transformers import load

    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "x.bin").write_bytes(b"junk")
    with pytest.raises(UserError, match="neither"):
        load(tmp_path / "x.bin")
