"""What a model family becomes in GGUF, read from its registry entry (neuqi_export.archs.Family).

The GGUF architecture and its tensor names (gguf-py's TensorNameMap for that architecture), q/k row permutation,
the norm offset stored into the norm weights (Gemma: llama.cpp reads w + 1), per-layer sliding windows and the
rope base of the sliding layers, the family's extra keys, and what llama.cpp hard-codes for a family (NoPE layers,
the attention scale): a config that llama.cpp would run differently is refused before anything is written.
"""
from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np

from neuqi_export.archs import Family, family_for, head_dim
from neuqi_export.errors import UserError

ROPE_TYPES = ("default", "linear", "yarn", "llama3")  # what metadata.add_hparams writes for every family
_ARCH_BY_NAME = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def check(config: dict) -> Family:
    """The family of `config`, or a one-line UserError naming the family and what GGUF (llama.cpp) cannot express."""
    fam = family_for(config)
    mt = fam.model_type
    if fam.gguf_arch is None or fam.gguf_arch not in _ARCH_BY_NAME:
        raise UserError(f"{mt}: llama.cpp has no GGUF architecture for this family; export another format (onnx, mlx)")
    n_q = int(config["num_attention_heads"]) * head_dim(config)
    if fam.gguf_q_full_width and n_q != int(config["hidden_size"]):
        raise UserError(f"{mt}: llama.cpp's {fam.gguf_arch} needs heads x head_dim = hidden_size, this model has "
                        f"{n_q} != {config['hidden_size']}; export another format")
    layers = fam.layer_attention(config)
    ctx = int(config.get("max_position_embeddings", 2048))
    windows = sorted({a.window for a in layers if a.window and a.window < ctx})
    if windows and not fam.gguf_sliding_window:
        raise UserError(f"{mt}: llama.cpp's {fam.gguf_arch} has no sliding-window attention (this model's layers use a "
                        f"window of {windows[0]} tokens), so a GGUF export would differ beyond it; export another format")
    roped = [a.rope is not None for a in layers]
    step = fam.gguf_nope_interval
    want = [step == 0 or (i + 1) % step != 0 for i in range(len(layers))]
    if roped != want:
        raise UserError(f"{mt}: rotary on layers {[int(r) for r in roped]} cannot be expressed in GGUF (llama.cpp's "
                        f"{fam.gguf_arch} ropes {[int(r) for r in want]}); export another format")
    thetas = {a.rope.get("rope_theta") for a in layers if a.rope is not None and not a.window}
    if len(thetas) > 1:
        raise UserError(f"{mt}: full-attention layers with different rope bases {sorted(thetas)} cannot be expressed "
                        "in GGUF; export another format")
    kind = main_rope(fam, config).get("rope_type", "default")
    kinds = ROPE_TYPES + fam.gguf_rope_scalings
    if kind not in kinds:
        raise UserError(f"{mt}: rope scaling {kind!r} is not written to GGUF by neuqi-export (it writes "
                        f"{', '.join(kinds)} for llama.cpp's {fam.gguf_arch}); export another format")
    fold = query_fold(fam, config)
    if fold != 1.0 and any(fam.fused) and fam.norms.q is None:
        raise UserError(f"{mt}: attention scale {fam.attention_scale(config):.4g} differs from llama.cpp's "
                        f"{fam.gguf_attention_scale(config):.4g} and the fused q projection cannot carry it; "
                        "export another format")
    return fam


def check_head(fam: Family, tied: bool) -> None:
    """UserError when the model has its own output head but llama.cpp's architecture has no output tensor (gemma2)."""
    if not tied and gguf.MODEL_TENSOR.OUTPUT not in gguf.MODEL_TENSORS[_ARCH_BY_NAME[fam.gguf_arch]]:
        raise UserError(f"{fam.model_type}: llama.cpp's {fam.gguf_arch} always ties the output head to the embedding, "
                        "this model has its own head; export another format")


def tensor_map(fam: Family, n_blocks: int) -> gguf.TensorNameMap:
    """gguf-py's HF -> GGUF tensor names for the family's architecture (only that architecture's tensors)."""
    return gguf.get_tensor_name_map(_ARCH_BY_NAME[fam.gguf_arch], n_blocks)


def query_fold(fam: Family, config: dict) -> float:
    """The factor the queries must be multiplied by so that llama.cpp's fixed attention scale gives the model's
    (Gemma's query_pre_attn_scalar when it is not head_dim); 1.0 where they agree."""
    ratio = fam.attention_scale(config) / fam.gguf_attention_scale(config)
    return 1.0 if abs(ratio - 1.0) < 1e-6 else float(ratio)


def q_name(fam: Family, layer: int) -> str:
    """The HF name that carries the query fold in layer `layer`: the per-head q norm (an RMSNorm of q undoes a
    scaled q_proj) where the family has one, else the q projection."""
    return f"{fam.blocks_path}.{layer}.{fam.norms.q or 'self_attn.q_proj'}"


def fold_names(fam: Family, config: dict) -> set[str]:
    """HF tensor names that carry the query fold (q norm, or q_proj weight and bias), empty where there is none."""
    if query_fold(fam, config) == 1.0:
        return set()
    return {f"{q_name(fam, i)}.{p}" for i in range(int(config["num_hidden_layers"])) for p in ("weight", "bias")}


def float_tensor(fam: Family, name: str, value: np.ndarray, norms: set[str], folded: set[str], fold: float) -> np.ndarray:
    """A float master tensor as llama.cpp reads it: a norm + norm_offset, a fold-carrying tensor times the fold."""
    if name in norms and fam.norm_offset:
        value = value + np.float32(fam.norm_offset)
    if name in folded:
        value = value * np.float32(fold)
    return value


def fold_linear(lin, fold: float):
    """A quantized q projection with the query fold applied: its scales times `fold` (codes unchanged)."""
    return replace(lin, scale=lin.scale * fold)


def add_arch_hparams(w: gguf.GGUFWriter, fam: Family, config: dict) -> None:
    """Sliding windows (one window, the per-layer pattern, the sliding layers' rope base) and the family's extra
    keys."""
    layers = fam.layer_attention(config)
    if fam.gguf_sliding_window and any(a.window for a in layers):
        w.add_sliding_window(int(next(a.window for a in layers if a.window)))
        w.add_sliding_window_pattern([bool(a.window) for a in layers])
        swa = [a.rope for a in layers if a.window and a.rope is not None]
        if swa:
            w.add_float32(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=fam.gguf_arch), float(swa[0]["rope_theta"]))
    for key, val in fam.gguf_keys(config).items():
        full = f"{fam.gguf_arch}.{key}"
        if isinstance(val, bool):
            w.add_bool(full, val)
        elif isinstance(val, int):
            w.add_uint32(full, val)
        elif isinstance(val, float):
            w.add_float32(full, val)
        else:
            w.add_array(full, list(val))


def main_rope(fam: Family, config: dict) -> dict:
    """The rope settings of the full-attention layers (the sliding ones' where every layer slides), as
    metadata.add_hparams reads them: rope_theta and the scaling fields."""
    layers = [a for a in fam.layer_attention(config) if a.rope is not None]
    if not layers:
        return {"rope_theta": 10000.0, "rope_type": "default"}
    full = [a for a in layers if not a.window]
    return dict((full or layers)[0].rope)


def block_linears(config: dict) -> dict[str, tuple[str, int]]:
    """{GGUF role (attn_q, attn_qkv, ffn_up, ...): (HF linear inside a block, its row length = input dim)} of each
    quantized linear of a block, in calibration order."""
    fam = check(config)
    tmap = tensor_map(fam, 1)
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
    hd = int(config.get("head_dim") or n_embd // n_head)
    rows = {"attn_output": n_head * hd, "ffn_down": int(config["intermediate_size"])}
    out = {}
    for lin in fam.linear_names:
        g = tmap.get_name(f"{fam.blocks_path}.0.{lin}.weight", try_suffixes=(".weight",))
        if g is None:
            raise UserError(f"{fam.model_type}: linear {lin!r} has no GGUF name in llama.cpp's {fam.gguf_arch}; "
                            "export another format")
        role = g.split(".")[2]
        out[role] = (lin, rows.get(role, n_embd))
    return out
