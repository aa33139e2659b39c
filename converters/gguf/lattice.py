"""K-quant-aware quantization: GPTQ directly on a GGUF type's lattice, so nothing is refit afterwards.

Once its block parameters are fixed, every GGUF type the presets use offers each sub-block of B weights a
set of K reconstruction values: affine ones (Q2_K..Q6_K: d*sc*q - dmin*m; Q4_0/Q5_0/Q8_0: d*(q - c);
Q4_1/Q5_1: d*q + m) or a fixed non-uniform table (IQ4_NL: d*kv[q]). A linear is quantized for its type the
way NeUQI + GPTQ quantize a uniform grid:

  1. fit the type's block parameters on the ORIGINAL weights with the diag(H) objective Σ_j h_j (w_j − ŵ_j)²
     (the fitting code of kquants.py / presets.py, here fed W instead of a master's dequantized values);
  2. read the K values of every sub-block exactly as llama.cpp computes them: pack the parameters with weight
     k of every sub-block set to code k and dequantize once with gguf.quants (no second formula that could
     drift from the runtime; for K > 32 the affine progression is read from k = 0 and 1);
  3. GPTQ with those parameters fixed (static groups, act-order), each column rounded to the nearest value
     its sub-block offers;
  4. pack the codes with the fitted parameters: the file holds exactly the weights GPTQ compensated for.

The fitting, the value tables and the packing are this project's own code (no library fits K-quant block
parameters on a weighted objective); dequantization is gguf-py's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gguf
import numpy as np
import torch

from neuqi_export.errors import UserError
from neuqi_export.gptq import GPTQFactor, TableColumns, gptq_with_rounding, nearest, nearest_affine
from neuqi_export.timing import StageTimer

from .kquants import fit_affine_blocks, fit_k_params, pack_k
from .packers import QK, QK_K, fit_q6_k_params, fit_q8_0_params, pack_q4_1, pack_q5_1, pack_q6_k, pack_q8_0
from .presets import CODEBOOKS, fit_codebook_blocks, fit_q5_k_params, pack_codebook, pack_q5_k

FLOAT = ("F16", "F32")


@dataclass(frozen=True)
class LatticeType:
    """A GGUF block type seen as per-sub-block value sets: fit(w, h) -> (params, codes), pack(params, codes) -> bytes."""

    name: str
    sub_block: int  # weights sharing one value set
    levels: int  # K, codes 0..K-1
    row_multiple: int  # rows (input dims) must be a multiple of this
    fit: Callable[[np.ndarray, np.ndarray], tuple[tuple, np.ndarray]]
    pack: Callable[[tuple, np.ndarray], np.ndarray]


def _k(name):
    return (lambda w, h: fit_k_params(w, h, name)), (lambda p, q: pack_k(name, p, q))


def _codebook(name):
    kv = CODEBOOKS[name]

    def fit(w, h):
        rows, n = w.shape
        q, d = fit_codebook_blocks(np.asarray(w, np.float64).reshape(rows, n // QK, QK), h.reshape(1, n // QK, QK), kv)
        return (d,), q.reshape(rows, n)

    return fit, (lambda p, q: pack_codebook(name, q, p[0]))


def _affine(levels, packer):
    def fit(w, h):
        rows, n = w.shape
        q, d16, m16, _ = fit_affine_blocks(np.asarray(w, np.float64).reshape(rows, n // QK, QK),
                                           h.reshape(1, n // QK, QK), levels)
        return (d16, m16), q.reshape(rows, n)

    return fit, (lambda p, q: packer(q, p[0], p[1]))


def _q6_k_fit(w, h):
    sc, d16, q = fit_q6_k_params(w)  # 64 levels: the plain fit; weighting adds next to nothing at 6 bits
    return (sc, d16), q


def _q8_0_fit(w, h):
    d, q = fit_q8_0_params(w)
    return (d,), (q.astype(np.int16) + 128).astype(np.uint8)


LATTICES: dict[str, LatticeType] = {}
for _name, _B, _K, _mult, (_fit, _pack) in (
    ("Q2_K", 16, 4, QK_K, _k("Q2_K")),
    ("Q3_K", 16, 8, QK_K, _k("Q3_K")),
    ("Q4_K", 32, 16, QK_K, _k("Q4_K")),
    ("Q5_K", 32, 32, QK_K, (fit_q5_k_params, lambda p, q: pack_q5_k(q, *p))),
    ("Q6_K", 16, 64, QK_K, (_q6_k_fit, lambda p, q: pack_q6_k(q, *p))),
    ("Q4_0", 32, 16, QK, _codebook("Q4_0")),
    ("Q5_0", 32, 32, QK, _codebook("Q5_0")),
    ("IQ4_NL", 32, 16, QK, _codebook("IQ4_NL")),
    ("Q4_1", 32, 16, QK, _affine(16, pack_q4_1)),
    ("Q5_1", 32, 32, QK, _affine(32, pack_q5_1)),
    ("Q8_0", 32, 256, QK, (_q8_0_fit, lambda p, q: pack_q8_0(q.astype(np.int16) - 128, p[0]))),
):
    LATTICES[_name] = LatticeType(_name, _B, _K, _mult, _fit, _pack)


CODEBOOK_LATTICES = ("IQ4_NL",)  # values not affine in the code: nearest by search


def lattice(qtype: str) -> LatticeType:
    """The registered LatticeType; UserError naming the supported ones otherwise."""
    if qtype not in LATTICES:
        raise UserError(f"GGUF type {qtype} has no K-quant-aware mode; use one of {', '.join(LATTICES)} or F16")
    return LATTICES[qtype]


def sub_block_values(lt: LatticeType, params: tuple, rows: int, n: int) -> np.ndarray:
    """float32 (rows, n/B, K): the value code k stands for in each sub-block, as gguf.quants dequantizes it."""
    ggml = gguf.GGMLQuantizationType[lt.name]
    B, K = lt.sub_block, lt.levels
    ks = np.arange(K) if K <= 32 else np.arange(2)  # K > 32: the affine progression is read from k = 0 and 1
    cols = []
    for at in range(0, len(ks), B):  # one pack per B codes: weight j of every sub-block holds code ks[at + j]
        part = ks[at:at + B]
        codes = np.broadcast_to(np.resize(part, B), (rows, n // B, B)).reshape(rows, n).astype(np.uint8)
        deq = gguf.quants.dequantize(lt.pack(params, codes), ggml).reshape(rows, n // B, B)
        cols.append(deq[..., :len(part)])
    vals = np.concatenate(cols, -1)
    if K <= 32:
        return vals.astype(np.float32)
    v0, step = vals[..., 0].astype(np.float32), (vals[..., 1] - vals[..., 0]).astype(np.float32)
    return v0[..., None] + step[..., None] * np.arange(K, dtype=np.float32)


@dataclass
class LatticeResult:
    data: np.ndarray  # the packed blocks, uint8 (rows, row_bytes); F16/F32: the float rows
    deq: torch.Tensor  # float32 (rows, n): what llama.cpp reads back


def quantize_for_type(W: torch.Tensor, H: torch.Tensor | None, hdiag: torch.Tensor, qtype: str, gptq: bool = True,
                      act_order: bool = True, timer: StageTimer | None = None,
                      factor: GPTQFactor | None = None) -> LatticeResult:
    """W (rows, n) quantized for GGUF `qtype`: block parameters fitted on W with diag(H), then GPTQ (when H is
    given and gptq) or nearest rounding on that fixed lattice. H damped (n, n) or None; hdiag (n,)."""
    timer = timer or StageTimer()
    rows, n = W.shape
    if qtype in FLOAT:
        data = W.detach().cpu().numpy().astype(np.float16 if qtype == "F16" else np.float32)
        return LatticeResult(data, torch.from_numpy(data.astype(np.float32)))
    lt = lattice(qtype)
    if n % lt.row_multiple:
        raise UserError(f"{qtype} needs an input dim that is a multiple of {lt.row_multiple}, got {n}; "
                        f"use a type whose block divides it (the presets fall back like llama-quantize)")
    w64 = W.detach().cpu().double().numpy()
    h = hdiag.detach().cpu().double().numpy()
    with timer.stage("fit"):
        params, _ = lt.fit(w64, h)
        V = torch.from_numpy(sub_block_values(lt, params, rows, n)).to(W.device)  # (rows, nsub, K)
    B = lt.sub_block
    near = nearest if lt.name in CODEBOOK_LATTICES else nearest_affine
    if gptq and H is not None:
        with timer.stage("gptq"):
            codes = gptq_with_rounding(W, H, TableColumns(V, B, affine=lt.name not in CODEBOOK_LATTICES),
                                       act_order=act_order, factor=factor)
    else:  # rows in chunks: the (rows, n, K) distance tensor of a big layer with K = 64/256 would not fit
        Wv = W.to(torch.float32).reshape(rows, n // B, B)
        step = max(1, (1 << 24) // (n * lt.levels))
        codes = torch.cat([near(Wv[r:r + step], V[r:r + step].unsqueeze(2).expand(-1, -1, B, -1))
                           for r in range(0, rows, step)])
        codes = codes.reshape(rows, n).to(torch.uint8)
    with timer.stage("pack"):
        data = lt.pack(params, codes.cpu().numpy().astype(np.uint8))
        deq = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).reshape(rows, n)
    return LatticeResult(data, torch.from_numpy(np.ascontiguousarray(deq, np.float32)))

