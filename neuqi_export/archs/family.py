"""What the toolkit knows about one model family (one HF `model_type`), as data.

A `Family` holds the layout (where the blocks, embedding, final norm and head live; the linears in
calibration order; the norms of a block by role; fused projections) and, as small functions of the HF
config, the hyper-parameters every exporter reads the same way (activation, scales, soft-caps, the
sliding window and rotary settings of each layer). Per-format names (GGUF architecture, onnxruntime-genai
and mlx-lm model types) sit in the entry too, so that no file outside `archs/` names a model_type.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserError

# Inside a block, linears are quantized in these subsets, in this order (NEUQI.md); the linears of one
# subset read the same input, so they share one Hessian.
LLAMA_SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class BlockNorms:
    """HF names (inside a block) of the norms a block applies, by role; None where the family has none.

    attn_in: on the block input before attention; attn_out: on attention's output before the residual add;
    ffn_in: on the residual stream before the MLP; ffn_out: on the MLP's output before the residual add;
    q / k: on the query / key projections, over each head (`qk_span` 'head') or the whole width ('full').
    """

    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    ffn_in: str | None = "post_attention_layernorm"
    ffn_out: str | None = None
    q: str | None = None
    k: str | None = None
    qk_span: str = "head"

    def present(self) -> dict[str, str]:
        """{role: HF name} of the norms this family has."""
        roles = ("attn_in", "attn_out", "ffn_in", "ffn_out", "q", "k")
        return {r: getattr(self, r) for r in roles if getattr(self, r) is not None}


@dataclass(frozen=True)
class LayerAttention:
    """How layer i attends: its sliding window (None: full causal) and rotary settings (None: no rotary)."""

    window: int | None
    rope: dict | None  # {'rope_theta': ..., 'rope_type': ..., type fields}; None for a NoPE layer


def _cfg_rope(config: dict) -> dict:
    """transformers 5 rope_parameters (or 4.x rope_theta / rope_scaling) as one flat dict."""
    params = dict(config.get("rope_parameters") or {})
    for k, v in (config.get("rope_scaling") or {}).items():
        params.setdefault(k, v)
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type", params.get("type", "default")) or "default"
    params.pop("type", None)
    return params


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


@dataclass(frozen=True)
class Family:
    """One registered model family. Functions of the config take the HF config dict."""

    model_type: str
    gguf_arch: str  # llama.cpp architecture name
    gguf_permute_qk: bool  # q/k rows reordered to GGML's interleaved rotary layout (LlamaModel.undo_permute)
    genai_type: str | None  # onnxruntime-genai model.type, None where genai has none
    mlx_type: str | None  # mlx-lm model_type, None where mlx-lm has none
    mlx_sliding_window: bool = True  # does mlx-lm's code for the family apply the config's sliding windows?
    # mlx-lm reads per-layer attention as a period (layer i global iff i % sliding_window_pattern == pattern - 1),
    # rope_local_base_freq (sliding layers) and rope_theta / rope_scaling (global layers): mlx_lm/models/gemma3_text.py
    mlx_window_pattern: bool = False
    mlx_softcap: bool = True  # does mlx-lm's code for the family apply attn/final logit soft-caps?
    mlx_embed_scale_bf16: bool = False  # mlx-lm multiplies embeddings by the family's scale rounded to bfloat16
    subsets: tuple = LLAMA_SUBSETS
    norms: BlockNorms = BlockNorms()
    # fused projections: {HF linear: ((part, rows as a function of the config), ...)} in row order
    fused: dict = field(default_factory=dict)
    # norms compute x̂ * (norm_offset + w) with w the stored weight (Gemma: 1.0); every RMSNorm of the model
    norm_offset: float = 0.0
    activation_key: str = "hidden_act"
    blocks_path: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    embedding_scale: Callable[[dict], float] = lambda c: 1.0
    attention_scale: Callable[[dict], float] = lambda c: head_dim(c) ** -0.5
    residual_scale: Callable[[dict], float] = lambda c: 1.0
    logit_scale: Callable[[dict], float] = lambda c: 1.0  # logits are multiplied by this
    attn_softcap: Callable[[dict], float | None] = lambda c: c.get("attn_logit_softcapping") or None
    final_softcap: Callable[[dict], float | None] = lambda c: c.get("final_logit_softcapping") or None
    # 0/1 per layer: does layer i apply rotary embeddings (SmolLM3's NoPE layers); None: every layer does
    rope_layers: Callable[[dict], list | None] = lambda c: None
    # extra GGUF key/values as {key suffix after '<arch>.': value} (ints, floats, bools, lists of bools)
    gguf_keys: Callable[[dict], dict] = lambda c: {}
    # mixture of experts: the block's experts module (transformers 5 fused 3-D `gate_up_proj` (E, 2I, H) and
    # `down_proj` (E, H, I), quantized per expert by neuqi_export/experts.py) and its router (kept float); None: dense
    experts: str | None = None
    router: str | None = None
    # does the router renormalise its top-k weights to sum 1 for this config (transformers' MixtralTopKRouter always;
    # Qwen3MoeTopKRouter when norm_topk_prob)? None: the family's routing is not known to the exporters
    router_renormalises: Callable[[dict], bool] | None = None
    mlx_moe: str | None = None  # mlx-lm's name of the MoE block holding `switch_mlp` and `gate`
    # how checkpoints name them (per expert): (experts path, gate, up, down part names) and the router's path
    experts_ckpt: tuple = ("mlp.experts", "gate_proj", "up_proj", "down_proj")
    router_ckpt: str = "mlp.gate"
    # what llama.cpp's code for the family does by itself (src/models/<arch>.cpp): applies the sliding windows;
    # skips rotary on layers i with (i + 1) % gguf_nope_interval == 0 (0: none); the attention scale it uses
    gguf_sliding_window: bool = False
    gguf_nope_interval: int = 0
    gguf_attention_scale: Callable[[dict], float] = lambda c: head_dim(c) ** -0.5
    gguf_q_full_width: bool = False  # llama.cpp sizes the queries hidden_size wide (head_dim = hidden / heads)
    gguf_rope_scalings: tuple = ()  # rope scalings llama.cpp's code reads for this family only (phi3: longrope)
    notes: str = ""

    # ------------------------------------------------------------------------------------------------
    @property
    def linear_names(self) -> tuple:
        """Every quantized linear of a block, in calibration order."""
        return tuple(name for subset in self.subsets for name in subset)

    def activation(self, config: dict) -> str:
        """'silu' or 'gelu_tanh' (the MLP's gate activation); UserError for another."""
        act = config.get(self.activation_key) or config.get("hidden_act") or "silu"
        canon = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}
        if act not in canon:
            raise UserError(f"{self.model_type}: activation {act!r} is not supported (silu, gelu_pytorch_tanh are); "
                            "quantize a model with one of those")
        return canon[act]

    def layer_attention(self, config: dict) -> list[LayerAttention]:
        """Each layer's sliding window and rotary settings, read from layer_types / sliding_window /
        per-layer-type rope_parameters as transformers does."""
        n = int(config["num_hidden_layers"])
        types = config.get("layer_types")
        window = config.get("sliding_window")
        if types is None:  # mistral-style: one window (or none) for every layer
            types = ["sliding_attention" if window else "full_attention"] * n
        if len(types) != n:
            raise UserError(f"config layer_types has {len(types)} entries for {n} layers; the config is broken")
        params = config.get("rope_parameters") or {}
        per_type = isinstance(params, dict) and set(params) >= set(types) and all(isinstance(params[t], dict) for t in types)
        flags = self.rope_layers(config)
        out = []
        for i, t in enumerate(types):
            if t not in ("full_attention", "sliding_attention"):
                raise UserError(f"{self.model_type}: layer type {t!r} is not supported (full_attention, "
                                "sliding_attention are)")
            rope = _cfg_rope({**config, "rope_parameters": params[t]}) if per_type else _cfg_rope(config)
            if flags is not None and not flags[i]:
                rope = None
            out.append(LayerAttention(int(window) if t == "sliding_attention" and window else None, rope))
        return out

    def norm_names(self, config: dict) -> list[str]:
        """Full HF names of every norm weight of the model (the blocks' and the final one)."""
        n = int(config["num_hidden_layers"])
        names = [f"{self.blocks_path}.{i}.{hf}.weight" for i in range(n) for hf in self.norms.present().values()]
        return names + [f"{self.final_norm}.weight"]


def gemma_embedding_scale(config: dict) -> float:
    return math.sqrt(float(config["hidden_size"]))


def gemma_attention_scale(config: dict) -> float:
    return float(config.get("query_pre_attn_scalar") or head_dim(config)) ** -0.5


def gemma_gguf_attention_scale(config: dict, big_layers: int) -> float:
    """llama.cpp's fixed Gemma query scale: hidden/heads for the 27B (`big_layers` layers), head_dim otherwise."""
    if int(config["num_hidden_layers"]) == big_layers:
        return (int(config["hidden_size"]) // int(config["num_attention_heads"])) ** -0.5
    return head_dim(config) ** -0.5
