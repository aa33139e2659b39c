"""GGUF key/values from a master checkpoint: the hyper-parameters.

Architecture facts (the GGUF architecture, names, per-family keys) come from the family registry: arch.py; the
tokenizer keys are written by vocab.py.
"""
from __future__ import annotations

import math

import numpy as np
import gguf

from neuqi_export.errors import UserError



def _rope(rope: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from one layer's flat rope settings (Family.layer_attention)."""
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    return float(rope.get("rope_theta", 10000.0)), (None if kind == "default" else rope)


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def llama3_rope_factors(config: dict, rope: dict) -> np.ndarray:
    """The per-frequency divisors llama.cpp reads from `rope_freqs.weight` for llama3-style scaling."""
    theta, sc = _rope(rope)
    dim = head_dim(config)
    factor = float(sc.get("factor", 8.0))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    f = np.where(wavelen < old_ctx / high, 1.0,
                 np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return f.astype(np.float32)


def longrope(config: dict, rope: dict) -> tuple[float, int, np.ndarray, np.ndarray]:
    """LongRoPE (phi3) as llama.cpp reads it: (attention factor, original context, long and short per-frequency
    divisors). The attention factor is the config's, else transformers' default sqrt(1 + ln s / ln n_orig) for
    s = max_position_embeddings / n_orig (1 when s <= 1); llama.cpp takes the long factors when its context exceeds
    n_orig, transformers when the sequence does."""
    n_orig = int(rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
                 or config.get("max_position_embeddings", 2048))
    factor = rope.get("factor") or int(config.get("max_position_embeddings", n_orig)) / n_orig
    attn = rope.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(n_orig))
    return float(attn), n_orig, np.asarray(rope["long_factor"], np.float32), np.asarray(rope["short_factor"], np.float32)


def add_hparams(w: gguf.GGUFWriter, config: dict, n_vocab: int, rope: dict) -> dict[str, np.ndarray]:
    """Write the model hyper-parameters (`rope`: the full-attention layers' rope settings); return the rope tensors
    the scaling needs ({GGUF name: float32 array}: rope_freqs for llama3, rope_factors_long/short for LongRoPE)."""
    try:
        n_head = int(config["num_attention_heads"])
        w.add_context_length(int(config.get("max_position_embeddings", 2048)))
        w.add_embedding_length(int(config["hidden_size"]))
        w.add_block_count(int(config["num_hidden_layers"]))
        w.add_feed_forward_length(int(config["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(config.get("num_key_value_heads") or n_head))
        w.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    except KeyError as exc:
        raise UserError(f"config.json lacks {exc.args[0]!r}; restore the model's config.json in the master checkpoint") from None
    hd = head_dim(config)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(int(hd * float(rope.get("partial_rotary_factor") or 1.0)))  # partial rotary (phi3)
    theta, scaling = _rope(rope)
    w.add_rope_freq_base(theta)
    w.add_vocab_size(n_vocab)
    if scaling is None:
        return {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", config.get("max_position_embeddings", 2048))))
    elif kind == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config, rope)}
    elif kind == "longrope":  # no scaling-type key: llama.cpp's phi3 reads the factor tensors (convert_hf_to_gguf too)
        attn, n_orig, long, short = longrope(config, rope)
        w.add_rope_scaling_attn_factors(attn)
        w.add_rope_scaling_orig_ctx_len(n_orig)
        return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    else:
        raise UserError(f"rope scaling {kind!r} has no GGUF equivalent in neuqi-export; use linear, yarn, llama3 or "
                        "(phi3) longrope scaling")
    return {}
