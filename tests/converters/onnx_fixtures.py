"""Builders shared by the ONNX tests: tiny random llama (tied) / qwen2 (untied, q/k/v biases) / mistral
(sliding window) models and a master checkpoint made from them with NeUQI parameters, without the
quantization pipeline. (Not named test_*, so pytest does not collect it; imported by name or by path like gguf_fixtures.)

Sizes: hidden 64, intermediate 160, 2 layers, 4 heads, 2 kv heads. With group size 64 the MLP's
down_proj has in_features 160 = 64 + 64 + 32: a ragged last group.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE = 64, 160


def build_model(arch: str, vocab: int, seed: int = 0, sliding_window: int | None = None, **config_kw):
    """A tiny random model of any registered family (tests/model_factory.py) with these tests' dimensions."""
    from model_factory import build_model as factory_model

    if arch == "llama":
        config_kw.setdefault("rope_theta", 50000.0)
    if arch == "mistral":
        config_kw["sliding_window"] = sliding_window
    return factory_model(arch, vocab, seed=seed, hidden=HIDDEN, intermediate=INTERMEDIATE, init_range=0.1, **config_kw)


@contextmanager
def one_torch_thread():
    """torch with one intra-op thread: on a busy 2-core machine its spinning OpenMP workers made the NeUQI
    parameter search ~30x slower (measured 1.9 s vs 45-55 s for one tiny master)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def build_master(model, bits: int, group_size: int, tok_dir: Path | None = None, method: str = "neuqi"):
    """Every attention / MLP linear quantized with NeUQI parameters (data-free) and round-to-nearest codes."""
    with one_torch_thread():
        return _build_master(model, bits, group_size, tok_dir, method)


def _build_master(model, bits, group_size, tok_dir, method):
    from model_factory import master_from_model

    from neuqi_export.master import QuantizedLinear
    from neuqi_export.quant.grid import quantize_codes
    from neuqi_export.quant.params import init_params

    def quantize(W):
        scale, zero = init_params(W, bits, group_size, method=method)
        codes = quantize_codes(W, scale, zero, bits, group_size)
        return QuantizedLinear(codes=codes, scale=scale.float(), zero=zero.float(), bits=bits, group_size=group_size)

    return master_from_model(model, quantize, tok_dir, {"bits": bits, "group_size": group_size, "init": method})


def reference_logits(master, ids: np.ndarray) -> np.ndarray:
    from neuqi_export.modeling import master_to_hf

    with one_torch_thread(), torch.no_grad():
        model = master_to_hf(master)
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(np.asarray(b)).max())
