"""The registered model families: one entry per HF model_type (facts from ../shared/ARCH_FACTS.md and the
transformers modeling files of each family)."""
from __future__ import annotations

from .family import (
    BlockNorms,
    Family,
    gemma_attention_scale,
    gemma_embedding_scale,
    gemma_gguf_attention_scale,
    head_dim,
)

_GEMMA_NORMS = dict(attn_in="input_layernorm", attn_out="post_attention_layernorm",
                    ffn_in="pre_feedforward_layernorm", ffn_out="post_feedforward_layernorm")


def _phi3_qkv(config: dict) -> tuple:
    hd, h = head_dim(config), int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or h)
    return (("q_proj", h * hd), ("k_proj", kv * hd), ("v_proj", kv * hd))


def _phi3_gate_up(config: dict) -> tuple:
    ff = int(config["intermediate_size"])
    return (("gate_proj", ff), ("up_proj", ff))


def _softcap_keys(c: dict, names=("attn_logit_softcapping", "final_logit_softcapping")) -> dict:
    """The soft-caps llama.cpp reads (`<arch>.attn_logit_softcapping` ...), where the config sets them."""
    return {k: float(c[k]) for k in names if c.get(k)}


def _granite_keys(c: dict) -> dict:
    return {"attention.scale": float(c.get("attention_multiplier", 1.0)),
            "embedding_scale": float(c.get("embedding_multiplier", 1.0)),
            "residual_scale": float(c.get("residual_multiplier", 1.0)),
            "logit_scale": float(c.get("logits_scaling", 1.0))}


# mixture of experts: attention subsets as in the dense families; the experts' gate/up and down follow per expert
_ATTN_SUBSETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_MOE = dict(subsets=_ATTN_SUBSETS, experts="mlp.experts", router="mlp.gate")


def _moe_keys(c: dict) -> dict:
    from ..experts import num_experts

    keys = {"expert_count": num_experts(c), "expert_used_count": int(c["num_experts_per_tok"])}
    if c.get("moe_intermediate_size"):
        keys["expert_feed_forward_length"] = int(c["moe_intermediate_size"])
    return keys


FAMILIES = (
    Family("llama", "llama", True, "llama", "llama"),
    Family("mistral", "llama", True, "mistral", "mistral"),
    Family("qwen2", "qwen2", False, "qwen2", "qwen2"),
    Family("qwen3", "qwen3", False, "qwen3", "qwen3",
           norms=BlockNorms(q="self_attn.q_norm", k="self_attn.k_norm", qk_span="head")),
    Family("gemma3_text", "gemma3", False, "gemma3_text", "gemma3_text", mlx_window_pattern=True, mlx_softcap=False,
           mlx_embed_scale_bf16=True,  # mlx_lm/models/gemma3_text.py
           norms=BlockNorms(**_GEMMA_NORMS, q="self_attn.q_norm", k="self_attn.k_norm", qk_span="head"),
           norm_offset=1.0, activation_key="hidden_activation", embedding_scale=gemma_embedding_scale,
           attention_scale=gemma_attention_scale, gguf_keys=lambda c: _softcap_keys(c, ("final_logit_softcapping",)),
           gguf_sliding_window=True, gguf_attention_scale=lambda c: gemma_gguf_attention_scale(c, 62)),
    Family("gemma2", "gemma2", False, "gemma2", "gemma2", mlx_sliding_window=False,  # mlx_lm/models/gemma2.py
           norms=BlockNorms(**_GEMMA_NORMS), norm_offset=1.0, activation_key="hidden_activation",
           embedding_scale=gemma_embedding_scale, attention_scale=gemma_attention_scale, gguf_keys=_softcap_keys,
           gguf_sliding_window=True, gguf_attention_scale=lambda c: gemma_gguf_attention_scale(c, 46)),
    Family("phi3", "phi3", False, "phi3", "phi3",
           subsets=(("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
           fused={"self_attn.qkv_proj": _phi3_qkv, "mlp.gate_up_proj": _phi3_gate_up}, gguf_q_full_width=True,
           gguf_rope_scalings=("longrope",)),
    Family("granite", "granite", True, "granite", "granite",
           embedding_scale=lambda c: float(c.get("embedding_multiplier", 1.0)),
           attention_scale=lambda c: float(c.get("attention_multiplier", head_dim(c) ** -0.5)),
           residual_scale=lambda c: float(c.get("residual_multiplier", 1.0)),
           logit_scale=lambda c: 1.0 / float(c.get("logits_scaling", 1.0)), gguf_keys=_granite_keys,
           gguf_attention_scale=lambda c: _granite_keys(c)["attention.scale"]),
    Family("smollm3", "smollm3", True, "smollm3", "smollm3", rope_layers=lambda c: c.get("no_rope_layers"),
           gguf_nope_interval=4),
    Family("olmo2", "olmo2", False, None, "olmo2",
           norms=BlockNorms(attn_in=None, attn_out="post_attention_layernorm", ffn_in=None,
                            ffn_out="post_feedforward_layernorm", q="self_attn.q_norm", k="self_attn.k_norm",
                            qk_span="full"), gguf_sliding_window=True, gguf_q_full_width=True),
    Family("qwen3_moe", "qwen3moe", False, None, "qwen3_moe", **_MOE, mlx_moe="mlp", gguf_keys=_moe_keys,
           router_renormalises=lambda c: bool(c.get("norm_topk_prob", False)),
           norms=BlockNorms(q="self_attn.q_norm", k="self_attn.k_norm", qk_span="head")),
    Family("mixtral", "llama", True, None, "mixtral", **_MOE, mlx_moe="block_sparse_moe", gguf_keys=_moe_keys,
           router_renormalises=lambda c: True,
           experts_ckpt=("block_sparse_moe.experts", "w1", "w3", "w2"), router_ckpt="block_sparse_moe.gate"),
)
