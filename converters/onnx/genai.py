"""genai_config.json for onnxruntime-genai (written from its documented config layout).

The graph concatenates past and current keys/values itself (present = past ++ new), so the KV buffers
are not shared between past and present: `past_present_share_buffer` is false. `model.type` is the family's
onnxruntime-genai model type (Family.genai_type); a family genai has no type for gets no config (`genai_config`
returns None and `skip_reason` says why).
"""
from __future__ import annotations


def _first(v, default=None):
    if isinstance(v, (list, tuple)):
        return v[0] if v else default
    return default if v is None else v


def skip_reason(dims) -> str | None:
    """One line saying why the export has no genai_config.json, or None when it has one."""
    if dims.family.genai_type is not None:
        return None
    return (f"genai_config.json left out: onnxruntime-genai has no model type for {dims.model_type}; "
            "model.onnx still runs in onnxruntime (neuqi-export eval, runtimes.onnxruntime)")


def genai_config(cfg: dict, dims, filename: str = "model.onnx", provider_options: list | None = None) -> dict | None:
    """The genai_config.json dict for a graph of these dims (ModelDims), or None where genai has no model type."""
    if skip_reason(dims) is not None:
        return None
    ctx = int(cfg.get("max_position_embeddings") or 2048)
    eos = cfg.get("eos_token_id")
    eos = eos if eos is not None else 0
    pad = cfg.get("pad_token_id")
    pad = _first(eos) if pad is None else pad
    bos = cfg.get("bos_token_id")
    return {
        "model": {
            "bos_token_id": _first(bos, _first(eos)),
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options or []},
                "filename": filename,
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": dims.heads,
                "num_hidden_layers": dims.layers,
                "num_key_value_heads": dims.kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": dims.family.genai_type,
            "vocab_size": dims.vocab,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }
