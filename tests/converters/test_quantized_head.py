"""A quantized output head (`quantize --lm-head-bits`) through every exporter, each run in its own runtime and
compared with the master dequantized in transformers. Tiny llama (tied: the head is the embedding too) and
qwen2 (untied), body 3-bit g32; masters from the `head_master` fixture (the real pipeline)."""
from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open

from neuqi_export.master import MasterCheckpoint
from neuqi_export.modeling import master_to_hf

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(master_dir) -> np.ndarray:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(master_dir))
    text = "The capital of France is Paris, and the capital of Italy is Rome. In 1999 there were 42 cats in the city."
    return np.array([tok(text)["input_ids"][:24]])


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _reference(master, ids) -> np.ndarray:
    with torch.no_grad():
        return master_to_hf(master)(torch.from_numpy(ids)).logits.numpy()


def _keys(path) -> set:
    with safe_open(str(path), "np") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch,head_bits", [("llama", 4), ("llama", 8), ("qwen2", 4)])
def test_gguf(head_master, tmp_path, arch, head_bits):
    """Tied: token_embd is the head's record (Q4_1 exact when its codes fit the linears' type, else the output
    type, Q8_0 here: 64 % 256 != 0), no output.weight. Untied: output.weight is the head's record."""
    from converters.gguf import export_gguf
    from runtimes.llamacpp import LlamaCppScorer

    path = head_master(arch, head_bits)
    master = MasterCheckpoint.load(path)
    out = tmp_path / "m.gguf"
    # untied: the float embedding in F32 (its default, a Q4_1 refit from float, is not what is tested here)
    rep = export_gguf(master, out, qtype="Q4_1", embed_type="auto" if arch == "llama" else "F32")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    report = {t.name: t for t in rep.tensors}
    head_t = "Q4_1" if head_bits <= 4 else "Q8_0"
    if arch == "llama":
        assert "output.weight" not in types and types["token_embd.weight"] == head_t
        assert report["token_embd.weight"].exact == (head_t == "Q4_1")
    else:
        assert types["output.weight"] == head_t and report["output.weight"].exact
    ids = _ids(path)
    sc = LlamaCppScorer(out, n_ctx=64)
    got = sc.logits(ids)
    sc.close()
    ref = _reference(master, ids)
    # llama.cpp rounds activations to 8 bits inside Q4_1 matmuls (see test_gguf_export.py); measured 0.6% here
    assert _rel(got, ref) < 0.05 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("head_bits", [2, 4, 8])
@pytest.mark.parametrize("zero_point", ["fast", "float"])
def test_onnx_tied_gathers_the_quantized_head(head_master, tmp_path, head_bits, zero_point):
    """The embedding is a GatherBlockQuantized on the lm_head MatMulNBits' own weights (4/8-bit: one shared B,
    zero points and correction; 2-bit: a 4-bit copy), no float (vocab, hidden) table; logits equal the master's
    (fp32 activations)."""
    from converters.onnx import export_onnx
    from runtimes.onnxruntime import load

    path = head_master("llama", head_bits)
    master = MasterCheckpoint.load(path)
    out = tmp_path / "onnx"
    export_onnx(master, out, zero_point=zero_point, accuracy_level=1, float_storage="exact")
    model = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and ops.count("MatMulNBits") == 15
    vocab, hidden = master.linears["lm_head"].shape
    big = [t.name for t in model.graph.initializer if list(t.dims) in ([vocab, hidden], [hidden, vocab])]
    assert big == []
    own = {t.name for t in model.graph.initializer if t.name.startswith("lm_head.gather_")}
    assert ("lm_head.gather_data" in own) == (head_bits == 2)
    # the fast form's uint8 zero points and correction (always the form at 8 bits) are the lm_head node's own
    assert (own - {"lm_head.gather_data"} == set()) == (head_bits == 8 or (head_bits == 4 and zero_point == "fast"))
    ids = _ids(path)
    assert _rel(load(out).logits(ids), _reference(master, ids)) < 1e-5


def test_onnx_untied_head_is_matmulnbits(head_master, tmp_path):
    from converters.onnx import export_onnx
    from runtimes.onnxruntime import load

    path = head_master("qwen2", 4)
    master = MasterCheckpoint.load(path)
    export_onnx(master, tmp_path / "onnx", accuracy_level=1, float_storage="exact")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 15 and "GatherBlockQuantized" not in ops
    ids = _ids(path)
    assert _rel(load(tmp_path / "onnx").logits(ids), _reference(master, ids)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mlx(head_master, tmp_path, arch):
    """Tied: the head is stored as mlx-lm's QuantizedEmbedding (used as the output head through as_linear)."""
    from converters.mlx import export_mlx
    from runtimes.mlx import load

    path = head_master(arch, 4)
    master = MasterCheckpoint.load(path)
    export_mlx(master, tmp_path / "mlx", float_storage="exact")
    keys = _keys(tmp_path / "mlx" / "model.safetensors")
    quant = json.loads((tmp_path / "mlx" / "config.json").read_text())["quantization"]
    if arch == "llama":
        assert {"model.embed_tokens.weight", "model.embed_tokens.scales", "model.embed_tokens.biases"} <= keys
        assert not any(k.startswith("lm_head") for k in keys)
        assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    else:
        assert {"lm_head.scales", "model.embed_tokens.weight"} <= keys and "model.embed_tokens.scales" not in keys
    ids = _ids(path)
    assert _rel(load(tmp_path / "mlx").logits(ids), _reference(master, ids)) < 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compressed_tensors_keeps_the_head_float(head_master, tmp_path, arch):
    """transformers' compressed-tensors loader drops a packed lm_head, so the head is written as float values
    (tied: the embedding alone); with an integer-zero-point master the export is exact."""
    from converters.compressed_tensors import export_compressed_tensors
    from runtimes.transformers import load

    path = head_master(arch, 4, "neuqi_int")
    master = MasterCheckpoint.load(path)
    rep = export_compressed_tensors(master, tmp_path / "ct", float_storage="exact")
    assert next(t for t in rep.tensors if t.name == "lm_head").exact
    keys = _keys(tmp_path / "ct" / "model.safetensors")
    assert ("lm_head.weight" in keys) == (arch == "qwen2") and "lm_head.weight_packed" not in keys
    ids = _ids(path)
    assert _rel(load(tmp_path / "ct").logits(ids), _reference(master, ids)) < 1e-5
