"""llama-quantize's mixture presets (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q4_1, Q5_1): which
GGUF type each tensor gets, and at which bit width the master should be quantized for it.

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

  more_bits(i) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2  (integer division; i = layer, n = layers)
  ("others": attn_q, attn_k, ffn_gate, ffn_up; the "first 2/4" count attn_v tensors = layers.)

  output.weight (and token_embd when the embeddings are tied, i.e. the file has no output.weight):
  Q6_K, or Q8_0 when n_embd is not a multiple of the base type's block (then also of 256, see below).
  An untied token_embd gets the base type.

Fallback (rows not a multiple of the block): llama.cpp checks every chosen type against the row length
ne[0] (= the input dim of a linear, n_embd for embeddings/output); when a K type does not divide it it
falls back: Q2_K, Q3_K -> IQ4_NL; Q4_K -> Q5_0; Q5_K -> Q5_1; Q6_K -> Q8_0; and to F16 when even the
32-block fallback does not divide the row. On SmolLM2-135M (n_embd 576, ffn 1536) that means every
linear but ffn_down (1536 = 6*256) is a fallback type: llama-quantize's "Q2_K" of SmolLM2 is mostly
IQ4_NL, its "Q4_K_M" mostly Q5_0. `preset_plan` applies the same rule, so our files have the same
tensor types (and sizes) as llama-quantize's.

Bits: the width the master should be quantized at for a tensor = what the type can hold with a uniform
grid: Q2_K 2, Q3_K 3, Q4_K/Q4_0/Q4_1/IQ4_NL 4, Q5_K/Q5_0/Q5_1 5, Q6_K 6, Q8_0 8, F16 16. Exporting a
master whose codes are wider than a tensor's type is refused (UserError); narrower codes are refit
(or stored exactly for Q4_1/Q5_1) into the wider type.

Types not in the base exporter are written here from the master's dequantized weights, each fit on the
master's diag(H) objective Σ h (w - ŵ)²: Q5_K (affine 32-sub-blocks, 6-bit scales/mins, refit like
kquants.py), Q4_0 / Q5_0 / IQ4_NL (symmetric per-32 fp16 scale on the type's code book: scale grid +
weighted least squares + re-rounding), Q6_K and Q8_0 (the packers' float quantizers; 6/8 bits add
next to nothing).
"""
from __future__ import annotations

import gguf
import numpy as np

from neuqi_export.errors import UserError

from .exact import PackedTensor, weighted_error
from .packers import QK, QK_K, pack_q4_1, pack_q4_k, pack_q5_1, quantize_q6_k, quantize_q8_0

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q4_1", "Q5_1")
BASE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K",
        "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q4_1": "Q4_1", "Q5_1": "Q5_1"}
FILE_TYPE = {p: getattr(gguf.LlamaFileType, "MOSTLY_" + p) for p in PRESETS}
# bits a uniform master grid needs for the type (its capacity)
TYPE_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5,
             "Q8_0": 8, "IQ4_NL": 4, "F16": 16, "F32": 32}
BLOCK = {t: (QK_K if t.endswith("_K") else 1 if t in ("F16", "F32") else QK) for t in TYPE_BITS}
FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# the linears of a llama-style block: GGUF role -> HF module suffix
ROLES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def more_bits(i: int, n: int) -> bool:
    """llama-quantize's use_more_bits(i_layer, n_layers)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback_type(qtype: str, row_len: int) -> str:
    """The type llama-quantize actually uses for a row of `row_len` (falls back when the block does not divide it)."""
    if row_len % BLOCK[qtype] == 0:
        return qtype
    if qtype not in FALLBACK:
        return "F16"
    fb = FALLBACK[qtype]
    return fb if row_len % BLOCK[fb] == 0 else "F16"


def _role_type(preset: str, role: str, i: int, n: int, n_gqa: int) -> str:
    t = BASE[preset]
    if role == "attn_v":
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
    elif role == "ffn_down":
        if preset == "Q2_K":
            t = "Q3_K"
        elif preset == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif preset == "Q3_K_L":
            t = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and more_bits(i, n):
            t = "Q6_K"
        elif preset == "Q4_K_S" and i < n // 8:
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
    from .writer import WEIGHT_TYPES

    return name not in WEIGHT_TYPES and str(name).upper() in PRESETS


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
        plan[tname] = (t, TYPE_BITS[t])

    # output.weight rule: Q6_K, or Q8_0 when n_embd % block(base) != 0; then the usual fallback check
    out_t = "Q8_0" if n_embd % BLOCK[base] else ("Q6_K" if base != "Q8_0" else "Q8_0")
    if tied:
        put("token_embd.weight", out_t, n_embd)
    else:
        put("token_embd.weight", base, n_embd)
        put("output.weight", out_t, n_embd)
    for i in range(n):
        for role in ROLES:
            put(f"blk.{i}.{role}.weight", _role_type(preset, role, i, n, n_head // n_kv), rows_in[role])
    return plan


def row_lengths(c: dict) -> dict[str, int]:
    """{GGUF role: input dim (the GGUF row length)} of each linear of a llama-style block."""
    n_head = int(c["num_attention_heads"])
    n_embd = int(c["hidden_size"])
    hd = int(c.get("head_dim") or n_embd // n_head)
    return {"attn_q": n_embd, "attn_k": n_embd, "attn_v": n_embd, "attn_output": n_head * hd,
            "ffn_gate": n_embd, "ffn_up": n_embd, "ffn_down": int(c["intermediate_size"])}


def linear_names(model_config: dict, prefix: str = "model.layers") -> dict[str, str]:
    """{HF linear module name: GGUF weight name} for a llama-style model (layer by layer, ROLES order)."""
    n = int(model_config["num_hidden_layers"])
    return {f"{prefix}.{i}.{hf}": f"blk.{i}.{role}.weight" for i in range(n) for role, hf in ROLES.items()}


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


# ------------------------------------------------------------------------------------------------
# refits into the types the base exporter does not write

KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float64)
CODEBOOKS = {"Q4_0": np.arange(-8, 8, dtype=np.float64), "Q5_0": np.arange(-16, 16, dtype=np.float64),
             "IQ4_NL": KVALUES_IQ4NL}
EXTRA_TYPES = ("Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "IQ4_NL")


def _nearest(x, kv):
    """Index of the nearest code-book value (kv sorted ascending), ties to the lower one (searchsorted on the
    midpoints); uniform integer books by rounding, integer books (IQ4_NL) by a table on floor(2x)."""
    if np.all(np.diff(kv) == 1):
        return np.clip(np.rint(x - kv[0]), 0, len(kv) - 1).astype(np.intp)
    mids = (kv[1:] + kv[:-1]) / 2
    if not np.all(kv == np.rint(kv)):
        return np.searchsorted(mids.astype(x.dtype), x)
    # midpoints of integers are multiples of ½: with j = floor(2x), #(mids < x) = #(mids < j/2) + [x > j/2 ∈ mids]
    # (exact: 2x and j/2 are exact in binary floating point; 10x faster than np.searchsorted on 15 midpoints)
    lo, hi = int(2 * mids[0]) - 1, int(2 * mids[-1])
    halves = np.arange(lo, hi + 1) / 2
    below = np.searchsorted(mids, halves).astype(np.intp)
    on_mid = np.isin(halves, mids)
    with np.errstate(invalid="ignore"):
        j = np.clip(np.nan_to_num(np.floor(2 * x), nan=hi), lo, hi)  # NaN last, as searchsorted puts it
    t = j.astype(np.intp) - lo
    return below[t] + (~(x <= j / 2) & on_mid[t])  # ~(<=): NaN counts as above every midpoint


def fit_codebook_blocks(x: np.ndarray, h: np.ndarray, kv: np.ndarray, n_scales: int = 9):
    """Per block (last axis): fp16 d and indices q with x ≈ d * kv[q], minimising Σ h (x - d kv[q])².

    Candidates: the block's largest-|x| value mapped onto either end of the code book, times a grid of
    factors; the codes of each are re-fit by weighted least squares for d (fp16-rounded) and re-rounded.
    Returns (q uint8, d float16). Vectorised over the blocks of a chunk, chunks on threads.
    """
    from . import chunked

    x = np.asarray(x, np.float32)
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    hb = np.broadcast_to(np.asarray(h, np.float32), x2.shape)  # a view: chunks slice it, nothing is copied
    parts = chunked.map_row_chunks(lambda r: _fit_codebook_rows(x2[r], hb[r], kv, n_scales), x2.shape[0],
                                   x2[0].size)
    return (np.concatenate([p[0] for p in parts]).reshape(x.shape),
            np.concatenate([p[1] for p in parts]).reshape(x.shape[:-1]))


def _fit_codebook_rows(x: np.ndarray, h: np.ndarray, kv: np.ndarray, n_scales: int):
    """fit_codebook_blocks on blocks x (..., B) float32, h of x's shape."""
    kvf = kv.astype(np.float32)
    imax = np.abs(x).argmax(-1)
    vmax = np.take_along_axis(x, imax[..., None], -1)[..., 0]
    best_e = np.full(x.shape[:-1], np.inf, np.float32)
    best_d = np.zeros(x.shape[:-1], np.float32)

    def codes(d):
        safe = np.where(d != 0, d, 1.0).astype(np.float32)
        return _nearest(x / safe[..., None], kv)

    for end in (kv[0], kv[-1]):
        for t in np.linspace(0.85, 1.2, n_scales):
            d = (vmax / np.float32(end * t)).astype(np.float32)
            k = kvf[codes(d)]
            den = (h * k * k).sum(-1)
            d2 = np.where(den > 0, (h * x * k).sum(-1) / np.where(den > 0, den, 1), 0.0)
            d16 = d2.astype(np.float16).astype(np.float32)
            k = kvf[codes(d16)]
            e = (h * (x - d16[..., None] * k) ** 2).sum(-1)
            better = e < best_e
            best_e, best_d = np.where(better, e, best_e), np.where(better, d16, best_d)
    q = np.where(best_d[..., None] != 0, codes(best_d), _nearest(np.zeros_like(x), kv))
    return q.astype(np.uint8), best_d.astype(np.float16)


def pack_codebook(qtype: str, q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0 (18 B), Q5_0 (22 B), IQ4_NL (18 B) blocks from indices q (rows, n) and fp16 d (rows, n/32)."""
    rows, n = q.shape
    nb = n // QK
    zeros = np.zeros_like(d)
    if qtype == "Q5_0":  # Q5_1 layout minus m: d, qh, qs; code = index (value index - 16)
        b = pack_q5_1(q, d, zeros).reshape(rows, nb, 24)
        return np.concatenate([b[..., :2], b[..., 4:]], -1).reshape(rows, nb * 22)
    b = pack_q4_1(q, d, zeros).reshape(rows, nb, 20)  # Q4_0 / IQ4_NL: d, 16 bytes of nibbles
    return np.concatenate([b[..., :2], b[..., 4:]], -1).reshape(rows, nb * 18)


def pack_q5_k(q: np.ndarray, sc: np.ndarray, mn: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """Q5_K (256 weights, 176 bytes): fp16 d, fp16 dmin, 12 bytes 6-bit scales/mins (as Q4_K), 32 bytes qh
    (byte l, bit s = 5th bit of sub-block s's weight l), 128 bytes low nibbles (as Q4_K)."""
    q = np.asarray(q, np.uint8)
    rows, n = q.shape
    nsb = n // QK_K
    k4 = pack_q4_k(q & np.uint8(15), sc, mn, d, dmin).reshape(rows, nsb, 144)
    hi = (q.reshape(rows, nsb, 8, 32) >> np.uint8(4)) & np.uint8(1)
    qh = np.packbits(hi.transpose(0, 1, 3, 2), axis=-1, bitorder="little").reshape(rows, nsb, 32)
    return np.concatenate([k4[..., :16], qh, k4[..., 16:]], -1).reshape(rows, nsb * 176)


def fit_q5_k_params(w: np.ndarray, h: np.ndarray):
    """Q5_K parameters for w (rows, n), n % 256 == 0, on Σ h (w - ŵ)² (kquants.fit_k_params' steps).
    Returns ((sc, mn, d16, dm16), q uint8 0..31)."""
    from .kquants import fit_k_params

    return fit_k_params(w, h, "Q5_K")


def fit_q5_k(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Q5_K refit of w (rows, n), n % 256 == 0, on Σ h (w - ŵ)²: packed bytes."""
    params, q = fit_q5_k_params(w, h)
    return pack_q5_k(q, *params)


def refit_extra(w: np.ndarray, hdiag: np.ndarray | None, qtype: str, note: str = "") -> PackedTensor:
    """Master dequantized weights (rows, n) -> one of EXTRA_TYPES (n divisible by the type's block)."""
    rows, n = w.shape
    if n % BLOCK[qtype]:
        raise ValueError(f"{qtype} needs rows divisible by {BLOCK[qtype]}, got {n}")
    h = np.ones(n) if hdiag is None else np.asarray(hdiag, np.float64)
    if qtype == "Q5_K":
        data = fit_q5_k(w, h)
    elif qtype == "Q6_K":
        data = quantize_q6_k(w)
    elif qtype == "Q8_0":
        data = quantize_q8_0(w)
    else:
        kv = CODEBOOKS[qtype]
        q, d = fit_codebook_blocks(np.asarray(w, np.float64).reshape(rows, n // QK, QK), h.reshape(1, n // QK, QK), kv)
        data = pack_codebook(qtype, q.reshape(rows, n), d)
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    err, rel = weighted_error(w, back, h)
    return PackedTensor(data, qtype, False, err, rel, f"{qtype} refit (diag-H){'; ' + note if note else ''}")


__all__ = ["PRESETS", "is_mixture", "linear_names", "row_lengths", "preset_plan", "preset_bits", "fallback_type",
           "more_bits", "refit_extra", "describe", "TYPE_BITS", "EXTRA_TYPES"]
