"""Builders shared by the ONNX tests: tiny random llama (tied) / qwen2 (untied, q/k/v biases) / mistral
(sliding window) models and a master checkpoint made from them with NeUQI parameters, without the
quantization pipeline. (Not named test_*, so pytest does not collect it; imported by name or by path like gguf_fixtures.)

Sizes: hidden 64, intermediate 160, 2 layers, 4 heads, 2 kv heads. With group size 64 the MLP's
down_proj has in_features 160 = 64 + 64 + 32: a ragged last group.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE = 64, 160


def build_model(arch: str, vocab: int, seed: int = 0, sliding_window: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  initializer_range=0.1)
    if arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rope_theta=50000.0, **common)
    elif arch == "mistral":
        cfg = MistralConfig(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, sliding_window=sliding_window,
                            **common)
    else:
        cfg = Qwen2Config(tie_word_embeddings=False, eos_token_id=2, pad_token_id=0, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms and biases, so that their export is checked too
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


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
    from neuqi_export.master import MasterCheckpoint, QuantizedLinear
    from neuqi_export.quant.grid import quantize_codes
    from neuqi_export.quant.params import init_params

    cfg = json.loads(model.config.to_json_string())
    cfg["quantization_config"] = {"quant_method": "neuqi", "bits": bits, "group_size": group_size, "init": method}
    linears, tensors = {}, {}
    for name, p in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and (".self_attn." in name or ".mlp." in name):
            W = p.detach().float()
            scale, zero = init_params(W, bits, group_size, method=method)
            codes = quantize_codes(W, scale, zero, bits, group_size)
            linears[mod] = QuantizedLinear(codes=codes, scale=scale.float(), zero=zero.float(), bits=bits,
                                           group_size=group_size)
        elif name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        else:
            tensors[name] = p.detach().clone()
    return MasterCheckpoint(config=cfg, linears=linears, tensors=tensors,
                            tokenizer_dir=Path(tok_dir) if tok_dir is not None else None)


def reference_logits(master, ids: np.ndarray) -> np.ndarray:
    from neuqi_export.modeling import master_to_hf

    with one_torch_thread(), torch.no_grad():
        model = master_to_hf(master)
        return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max() / np.abs(np.asarray(b)).max())
