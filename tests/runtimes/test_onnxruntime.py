"""The onnxruntime runtime: detection, logits from an empty cache, greedy generation through the KV
cache (same tokens as transformers' greedy generate on the master's dequantized model), errors."""

import numpy as np
import pytest
import torch

from neuqi_export.errors import UserError
from fixture_modules import converter_fixtures


def _fixtures():
    return converter_fixtures("onnx_fixtures")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from converters.onnx import export_onnx

    fx = _fixtures()
    tmp = tmp_path_factory.mktemp("ort")
    master = fx.build_master(fx.build_model("qwen2", 400, seed=3), 4, 64)
    out = tmp / "onnx"
    export_onnx(master, out, accuracy_level=1, float_storage="exact")
    return out, master, fx


def test_registered_and_detects(exported, tmp_path):
    from runtimes.registry import load_all, runtime_for

    path, _, _ = exported
    assert "onnxruntime" in load_all()
    assert runtime_for(path).name == "onnxruntime"
    assert runtime_for(path / "model.onnx").name == "onnxruntime"
    rt = load_all()["onnxruntime"]
    assert not rt.detects(tmp_path) and not rt.detects(tmp_path / "x.gguf")


def test_logits_match_master(exported):
    from runtimes.onnxruntime import load

    path, master, fx = exported
    sc = load(path, n_threads=1)
    ids = np.random.default_rng(0).integers(0, 400, (3, 9))
    got = sc.logits(ids)
    assert got.shape == (3, 9, 400) and got.dtype == np.float32
    assert fx.rel_err(got, fx.reference_logits(master, ids)) < 1e-4
    assert np.array_equal(sc.logits(ids[0]), got[:1])  # a 1-d window is one row


def test_generate_matches_transformers(exported):
    from neuqi_export.modeling import master_to_hf
    from runtimes.onnxruntime import load

    path, master, _ = exported
    sc = load(path / "model.onnx", n_threads=1)
    prompt = [5, 17, 230, 99]
    new = sc.generate(prompt, 12)
    with torch.no_grad():
        ref = master_to_hf(master).generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                            pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    assert new == ref


def test_errors(exported, tmp_path):
    from runtimes.onnxruntime import load

    path, _, _ = exported
    with pytest.raises(UserError, match="token id"):
        load(path, n_threads=1).logits(np.array([[1, 400]]))
    with pytest.raises(UserError, match="no single model.onnx"):
        load(tmp_path)
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="could not load"):
        load(bad)
