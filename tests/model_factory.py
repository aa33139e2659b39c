"""One factory of tiny random models for every registered family (not collected by pytest).

`build_model(model_type, vocab)` makes a transformers CausalLM of that family from transformers' own
config and model classes, 2-3 layers, with the knobs that exercise the family's special cases
(FAMILY_KNOBS: a sliding window shorter than the test sequences, soft-capping, q/k norms, GQA, tied and
untied heads, NoPE layers, Granite's multipliers); norms and biases are made non-trivial so that their
export is checked too. A family added to the registry gets a model here from its model_type alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# per family: config fields beside the common tiny dimensions (head_dim 16 = hidden 64 / 4 heads)
_WINDOWED = dict(sliding_window=8, query_pre_attn_scalar=24, head_dim=16)
FAMILY_KNOBS: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=True),
    "mistral": dict(tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=True, head_dim=16),
    "gemma3_text": dict(tie_word_embeddings=True, num_hidden_layers=3, **_WINDOWED, final_logit_softcapping=8.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "gemma2": dict(tie_word_embeddings=True, num_hidden_layers=3, **_WINDOWED, attn_logit_softcapping=5.0,
                   final_logit_softcapping=8.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": dict(tie_word_embeddings=False, head_dim=16, partial_rotary_factor=0.5),
    "granite": dict(tie_word_embeddings=False, embedding_multiplier=4.0, attention_multiplier=0.2,
                    residual_multiplier=0.5, logits_scaling=2.0),
    "smollm3": dict(tie_word_embeddings=True, num_hidden_layers=4, no_rope_layers=[1, 1, 1, 0]),  # SmolLM3: every 4th NoPE
    "olmo2": dict(tie_word_embeddings=False, head_dim=16),
    # mixture of experts: 4 experts, top-2 (qwen3_moe renormalises the top-k: norm_topk_prob)
    "qwen3_moe": dict(tie_word_embeddings=True, head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=64, norm_topk_prob=True),
    "mixtral": dict(tie_word_embeddings=False, sliding_window=None, num_local_experts=4, num_experts_per_tok=2,
                    intermediate_size=64),
}
# the first three families keep the ids and fields their earlier builders gave them (pinned test values)
_IDS = {"llama": dict(bos_token_id=1, eos_token_id=2), "mistral": dict(bos_token_id=1, eos_token_id=2),
        "qwen2": dict(eos_token_id=2, pad_token_id=0)}


def families() -> list[str]:
    """Every registered model_type, in registry order."""
    from neuqi_export.archs import REGISTRY

    return list(REGISTRY)


def dense_families() -> list[str]:
    """The registered families without mixture-of-experts blocks (those GGUF and ONNX export today)."""
    from neuqi_export.archs import REGISTRY

    return [mt for mt, fam in REGISTRY.items() if fam.experts is None]


def tiny_config(model_type: str, vocab: int, hidden: int = 64, intermediate: int = 128, max_positions: int = 256,
                init_range: float = 0.15, **overrides):
    """The transformers config of a tiny `model_type` model with its family knobs (overrides win)."""
    from transformers import CONFIG_MAPPING

    fields = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_positions, rms_norm_eps=1e-5,
                  initializer_range=init_range)
    fields.update(_IDS.get(model_type, dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    fields.update(FAMILY_KNOBS.get(model_type, {}))
    fields.update(overrides)
    return CONFIG_MAPPING[model_type](**fields)


def build_model(model_type: str, vocab: int, seed: int = 0, perturb: float = 0.3, **config_kw):
    """A tiny random CausalLM of `model_type` (float32, eval mode): norms = (1 - offset) + perturb·N(0,1) so that
    the stored weight is non-trivial whatever the family's norm convention, biases perturb·N(0,1)."""
    from transformers import AutoModelForCausalLM

    from neuqi_export.archs import family_for

    cfg = tiny_config(model_type, vocab, **config_kw)
    offset = family_for(model_type).norm_offset
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 - offset + perturb * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(perturb * torch.randn_like(p))
    return model.eval()


def quantized_linear_names(config: dict) -> list[str]:
    """The HF module names the pipeline quantizes in a model of this config (every block's linears)."""
    from neuqi_export.archs import family_for

    fam = family_for(config)
    n = int(config["num_hidden_layers"])
    from neuqi_export.experts import expert_names

    names = (*fam.linear_names, *expert_names(fam, config))
    return [f"{fam.blocks_path}.{i}.{lin}" for i in range(n) for lin in names]


def _per_expert(sd: dict) -> dict:
    """The state dict with transformers 5's fused experts (`<x>.experts.gate_up_proj` / `.down_proj`) split into
    the per-expert `<x>.experts.<e>.{gate,up,down}_proj.weight` the master stores (neuqi_export/experts.py)."""
    from neuqi_export.experts import split_expert

    out = {}
    for name, p in sd.items():
        base, leaf = name.rsplit(".", 1)
        if base.endswith("experts") and leaf == "gate_up_proj":
            for e in range(p.shape[0]):
                for part, w in split_expert(p, sd[f"{base}.down_proj"], e).items():
                    out[f"{base}.{e}.{part}.weight"] = w
        elif not (base.endswith("experts") and leaf == "down_proj"):
            out[name] = p
    return out


def master_from_model(model, quantize, tok_dir: Path | None, qcfg: dict):
    """A MasterCheckpoint of `model`: every quantized linear from `quantize(W) -> QuantizedLinear`, the rest float
    (a tied lm_head is left out, as the pipeline does)."""
    from neuqi_export.master import MasterCheckpoint

    cfg = json.loads(model.config.to_json_string())
    cfg["quantization_config"] = {"quant_method": "neuqi", **qcfg}
    targets = set(quantized_linear_names(cfg))
    linears, tensors = {}, {}
    for name, p in _per_expert(model.state_dict()).items():
        mod = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and mod in targets:
            linears[mod] = quantize(p.detach().float())
        elif name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        else:
            tensors[name] = p.detach().clone()
    return MasterCheckpoint(config=cfg, linears=linears, tensors=tensors,
                            tokenizer_dir=Path(tok_dir) if tok_dir is not None else None)
