"""llama-quantize's mixture presets (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q4_1, Q5_1, Q4_0, Q5_0, Q8_0,
IQ4_NL): which GGUF type each tensor gets, and at which bit width the master should be quantized for it.

What llama-quantize does (llama.cpp src/llama-quant.cpp, `llama_tensor_get_type`, read for the facts;
dense, non-Falcon models, no --pure, no per-tensor overrides). Each preset has a base type that every
2-D weight gets unless a rule below says otherwise:

    preset   base   attn_v                       attn_output  ffn_down                          others
    Q2_K     Q2_K   Q3_K (Q4_K if n_gqa >= 4)    Q3_K         Q3_K                              base
    Q3_K_S   Q3_K   base                         base         base                              base
    Q3_K_M   Q3_K   Q5_K for the first 2, Q4_K   Q4_K         Q5_K if i < n/16, else Q4_K       base
    Q3_K_L   Q3_K   Q5_K                         Q5_K         Q5_K                              base
    Q4_K_S   Q4_K   Q5_K for the first 4         base         Q5_K if i < n/8                   base
    Q4_K_M   Q4_K   Q6_K if more_bits(i)         base         Q6_K if more_bits(i)              base
    Q5_K_S   Q5_K   base                         base         base                              base
    Q5_K_M   Q5_K   Q6_K if more_bits(i)         base         Q6_K if more_bits(i)              base
    Q6_K     Q6_K   base                         base         base                              base
    Q4_1     Q4_1   base                         base         base                              base
    Q5_1     Q5_1   base                         base         base                              base
    Q4_0     Q4_0   base                         base         base                              base
    Q5_0     Q5_0   base                         base         base                              base
    Q8_0     Q8_0   base                         base         base                              base
    IQ4_NL   IQ4_NL Q5_K if n_gqa >= 4           base         Q5_K if i < n/8                   base

  more_bits(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2  (integer division; i = layer, n = layers)
  ("others": attn_q, attn_k, ffn_gate, ffn_up; the "first 2/4" count attn_v tensors = layers.)

  output.weight (and token_embd when the embeddings are tied, i.e. the file has no output.weight):
  Q6_K, or Q8_0 when n_embd is not a multiple of the base type's block or the base is Q8_0 (then Q6_K's
  fallback, see below: Q8_0 when n_embd is not a multiple of 256; types.head_type). An untied token_embd gets
  the base type.

  Mixture of experts: llama-quantize sorts a tensor by its name ("ffn_down" in blk.N.ffn_down_exps), so the
  stacked experts follow the table's columns: ffn_down_exps takes ffn_down's rules, with i the block number read
  from the name (n_expert > 1) and n the layer count; ffn_gate_exps / ffn_up_exps take "others"; the router
  ffn_gate_inp is never quantized (F32, converters/gguf/experts.py). A model with exactly 8 experts (Mixtral
  8x7B) also gets: attn_v Q8_0 (after its rules above) and attn_k Q8_0 in every preset, attn_output Q5_K for
  Q2_K, Q3_K_S, Q3_K_M, Q4_K_S, Q4_K_M, IQ4_NL and the base type otherwise (the n_expert != 8 attn_output rules do
  not apply then). Rows of the expert stacks: n_embd for gate/up, the expert width for down (fallbacks as below).

  Rules llama-quantize applies only with an imatrix are not followed (our exports are compared with its
  imatrix-free output): with an imatrix, Q4_0 / Q5_0 put ffn_down of the first n/8 layers in Q4_1 / Q5_1, and
  IQ4_NL's ffn_down Q5_K rule applies only WITHOUT one (as here). 70B-model rules are not followed either.

  Q4_0 / Q5_0 / Q8_0 / IQ4_NL have no fallback in llama-quantize (it stops on a row that is not a multiple of
  32); a plan gives such a row F16 instead.

Fallback (rows not a multiple of the block): llama.cpp checks every chosen type against the row length
ne[0] (= the input dim of a linear, n_embd for embeddings/output); when a K type does not divide it it
falls back: Q2_K, Q3_K -> IQ4_NL; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and to F16 when even the
32-block fallback does not divide the row. On SmolLM2-135M (n_embd 576, ffn 1536) that means every
linear but ffn_down (1536 = 6*256) is a fallback type: llama-quantize's "Q2_K" of SmolLM2 is mostly
IQ4_NL, its "Q4_K_M" mostly Q5_0. `preset_plan` applies the same rule, so our files have the same
tensor types (and sizes) as llama-quantize's.

Bits: the width the master should be quantized at for a tensor = what the type can hold with a uniform
grid (each type's `bits` in types.py): Q2_K 2, Q3_K 3, Q4_K/Q4_0/Q4_1/IQ4_NL 4, Q5_K/Q5_0/Q5_1 5, Q6_K 6, Q8_0 8,
F16 16. Exporting a
master whose codes are wider than a tensor's type is refused (UserError); narrower codes are refit
(or stored exactly for Q4_1/Q5_1) into the wider type.

A tensor whose type cannot hold the master's codes is written from the master's dequantized weights (its row's
refit in types.py), fit on the master's diag(H) objective Σ h (w - ŵ)²: Q5_K (affine 32-sub-blocks, 6-bit
scales/mins, refit like kquants.py), Q8_0 / Q4_0 / Q5_0 / IQ4_NL (symmetric per-32 fp16 scale on the type's code
book: scale grid + weighted least squares + re-rounding; Q8_0 / Q4_0 / Q5_0 hold the codes exactly when the
zero-points are integers in range), Q6_K (the packers' float quantizer; 6 bits add next to nothing).
"""
from __future__ import annotations

import gguf

from neuqi_export.errors import UserError

from .arch import block_linears
from .experts import expert_roles
from .types import SINGLE_TYPES, TYPES, fallback_type, head_type

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_1", "Q5_1",
           "Q4_0", "Q5_0", "Q8_0", "IQ4_NL")
BASE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
        "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q4_1": "Q4_1", "Q5_1": "Q5_1", "Q4_0": "Q4_0",
        "Q5_0": "Q5_0", "Q8_0": "Q8_0", "IQ4_NL": "IQ4_NL"}
FILE_TYPE = {p: getattr(gguf.LlamaFileType, "MOSTLY_" + p) for p in PRESETS}
# a type's block, bits (capacity) and fallback are its row in types.py


def more_bits(i: int, n: int) -> bool:
    """llama-quantize's use_more_bits(i_layer, n_layers)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_MOE8_ATTN_OUT = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL")  # attn_output Q5_K with 8 experts


def _role_type(preset: str, role: str, i: int, n: int, n_gqa: int, n_expert: int = 1) -> str:
    """llama-quantize's type for a block tensor of GGUF `role` in layer i of n (before the row fallback)."""
    t = BASE[preset]
    if role.startswith("ffn_down"):  # llama-quant.cpp matches "ffn_down" in the name: ffn_down_exps too
        role = "ffn_down"
    if n_expert == 8 and role == "attn_k":
        return "Q8_0"
    if n_expert == 8 and role == "attn_output":
        return "Q5_K" if preset in _MOE8_ATTN_OUT else t
    if role in ("attn_v", "attn_qkv"):  # llama-quant.cpp category_is_attn_v: a fused qkv gets attn_v's rules
        if preset == "Q2_K":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            t = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            t = "Q6_K"
        elif preset == "Q4_K_S" and i < 4:
            t = "Q5_K"
        elif preset == "IQ4_NL" and n_gqa >= 4:
            t = "Q5_K"
        if n_expert == 8:
            t = "Q8_0"
    elif role == "ffn_down":
        if preset == "Q2_K":
            t = "Q3_K"
        elif preset == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif preset == "Q3_K_L":
            t = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            t = "Q6_K"
        elif preset in ("Q4_K_S", "IQ4_NL") and i < n // 8:  # IQ4_NL: llama-quantize without an imatrix
            t = "Q5_K"
    elif role == "attn_output":
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, t)
    return t


def _check_preset(name: str) -> str:
    key = str(name).upper()
    if key not in PRESETS:
        raise UserError(f"unknown GGUF preset {name!r}; use one of {', '.join(PRESETS)}")
    return key


def is_mixture(name) -> bool:
    """Is `name` (any case) a llama-quantize mixture preset rather than one of the exporter's single weight types?"""
    return name not in SINGLE_TYPES and str(name).upper() in PRESETS


def preset_plan(name: str, model_config: dict, tied: bool | None = None) -> dict[str, tuple[str, int]]:
    """{GGUF tensor name: (GGUF type, master bits)} for every 2-D weight, as llama-quantize would choose.

    Names: token_embd.weight, output.weight (only when untied), blk.N.attn_q/attn_k/attn_v/attn_output/
    ffn_gate/ffn_up/ffn_down.weight. Fallbacks for rows that are not a multiple of the block are applied.
    """
    preset = _check_preset(name)
    c = model_config
    n = int(c["num_hidden_layers"])
    n_head = int(c["num_attention_heads"])
    n_kv = int(c.get("num_key_value_heads") or n_head)
    n_embd = int(c["hidden_size"])
    if tied is None:
        tied = bool(c.get("tie_word_embeddings", False))
    base = BASE[preset]
    plan: dict[str, tuple[str, int]] = {}
    rows_in = row_lengths(c)

    def put(tname, t, row):
        t = fallback_type(t, row)
        plan[tname] = (t, TYPES[t].bits)

    out_t = head_type(base, n_embd)  # output.weight: Q6_K, or Q8_0 (n_embd % block(base) != 0, base Q8_0), fallback
    if tied:
        put("token_embd.weight", out_t, n_embd)
    else:
        put("token_embd.weight", base, n_embd)
        put("output.weight", out_t, n_embd)
    n_expert = _n_expert(c)
    for i in range(n):
        for role in rows_in:
            put(f"blk.{i}.{role}.weight", _role_type(preset, role, i, n, n_head // n_kv, n_expert), rows_in[role])
    return plan


def _n_expert(c: dict) -> int:
    """llama.cpp's n_expert (the expert_count key): the family's expert count, 1 for a dense family."""
    from neuqi_export.archs import family_for
    from neuqi_export.experts import num_experts

    return num_experts(c) if family_for(c).experts is not None else 1


def row_lengths(c: dict) -> dict[str, int]:
    """{GGUF role: input dim (the GGUF row length)} of each linear of a block of the model's family, the stacked
    experts' roles (ffn_{gate,up,down}_exps) included."""
    rows = {role: row for role, (_, row) in block_linears(c).items()}
    rows.update({role: row for role, row in expert_roles(c).values()})
    return rows


def linear_names(model_config: dict, prefix: str = "model.layers") -> dict[str, str]:
    """{HF linear module name: GGUF weight name} of the model's family (layer by layer, calibration order); every
    expert's gate/up/down (`<prefix>.<i>.<experts>.<e>.<part>`) names its block's stacked tensor."""
    from neuqi_export.archs import family_for

    n = int(model_config["num_hidden_layers"])
    roles = block_linears(model_config)
    experts = expert_roles(model_config)
    fam = family_for(model_config)
    out = {}
    for i in range(n):
        out.update({f"{prefix}.{i}.{hf}": f"blk.{i}.{role}.weight" for role, (hf, _) in roles.items()})
        for e in range(_n_expert(model_config) if experts else 0):
            out.update({f"{prefix}.{i}.{fam.experts}.{e}.{part}": f"blk.{i}.{role}.weight"
                        for part, (role, _) in experts.items()})
    return out


def _by_module(plan: dict[str, tuple[str, int]], model_config: dict, prefix: str, pick: int) -> dict:
    return {hf: plan[g][pick] for hf, g in linear_names(model_config, prefix).items()}


def preset_bits(name: str, model_config: dict, prefix: str = "model.layers") -> dict[str, int]:
    """{HF linear module name: bits the master should use} for a preset (the pipeline's per-tensor widths)."""
    return _by_module(preset_plan(name, model_config), model_config, prefix, 1)


def linear_types(model_config: dict, preset: str | None = None, qtype: str | None = None,
                 prefix: str = "model.layers") -> dict[str, str]:
    """{HF linear module name: GGUF type}: a preset's per-tensor plan, or one type for every linear with
    llama-quantize's fallback for rows its block does not divide (what the K-quant-aware mode quantizes for)."""
    if preset is not None:
        return _by_module(preset_plan(preset, model_config), model_config, prefix, 0)
    rows_in = row_lengths(model_config)
    return {hf: fallback_type(qtype, rows_in[g.split(".")[2]]) for hf, g in linear_names(model_config, prefix).items()}


def describe(name: str, model_config: dict) -> str:
    """A short human table of a plan: type -> count and which tensors."""
    from collections import defaultdict

    groups = defaultdict(list)
    for t, (ty, b) in preset_plan(name, model_config).items():
        groups[(ty, b)].append(t)
    return "\n".join(f"{ty} ({b}-bit): {len(v)} tensors, e.g. {', '.join(v[:3])}" for (ty, b), v in sorted(groups.items()))


__all__ = ["PRESETS", "is_mixture", "linear_names", "row_lengths", "preset_plan", "preset_bits", "fallback_type",
           "more_bits", "describe"]
