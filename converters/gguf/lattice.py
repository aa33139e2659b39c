"""K-quant-aware quantization: GPTQ directly on a GGUF type's lattice, so nothing is refit afterwards.

Once its block parameters are fixed, every GGUF type the presets use offers each sub-block of B weights a
set of K reconstruction values: affine ones (Q2_K..Q6_K: d*sc*q - dmin*m; Q4_0/Q5_0/Q8_0: d*(q - c);
Q4_1/Q5_1: d*q + m) or a fixed non-uniform table (IQ4_NL: d*kv[q]). A linear is quantized for its type the
way NeUQI + GPTQ quantize a uniform grid:

  1. fit the type's block parameters on the ORIGINAL weights with the diag(H) objective Σ_j h_j (w_j − ŵ_j)²
     (the types' fitting code, types.py, here fed W instead of a master's dequantized values);
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

import gguf
import numpy as np
import torch

from neuqi_export import grids
from neuqi_export.errors import UserError
from neuqi_export.master import GGUFLinear, register_blocks
from neuqi_export.gptq import GPTQFactor, TableColumns, gptq_with_rounding, nearest, nearest_affine
from neuqi_export.timing import StageTimer

from .types import TYPES, GGUFType


def lattice_types() -> tuple[str, ...]:
    """The GGUF types with a K-quant-aware mode (a lattice: values per sub-block, fit and pack), from their rows."""
    return tuple(t for t, row in TYPES.items() if row.levels)


def lattice(qtype: str) -> GGUFType:
    """The type's row (types.py) when it has a lattice; UserError naming the types that have one otherwise."""
    row = TYPES.get(qtype)
    if row is None or not row.levels:
        raise UserError(f"GGUF type {qtype} has no K-quant-aware mode; use one of {', '.join(lattice_types())} or F16")
    return row


def sub_block_values(lt: GGUFType, params: tuple, rows: int, n: int) -> np.ndarray:
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
    if qtype in TYPES and TYPES[qtype].is_float:
        data = W.detach().cpu().numpy().astype(np.float16 if qtype == "F16" else np.float32)
        return LatticeResult(data, torch.from_numpy(data.astype(np.float32)))
    lt = lattice(qtype)
    if n % lt.block:
        raise UserError(f"{qtype} needs an input dim that is a multiple of {lt.block}, got {n}; "
                        f"use a type whose block divides it (the presets fall back like llama-quantize)")
    w64 = W.detach().cpu().double().numpy()
    h = hdiag.detach().cpu().double().numpy()
    with timer.stage("fit"):
        params, _ = lt.fit(w64, h)
        V = torch.from_numpy(sub_block_values(lt, params, rows, n)).to(W.device)  # (rows, nsub, K)
    B = lt.sub_block
    near = nearest_affine if lt.affine else nearest
    if gptq and H is not None:
        with timer.stage("gptq"):
            codes = gptq_with_rounding(W, H, TableColumns(V, B, affine=lt.affine),
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



@dataclass(frozen=True)
class GGUFGrid:
    """A GGUF block type as a grid of the quantizer (neuqi_export.grids): the master holds the packed blocks."""

    qtype: str

    def quantize(self, W, H, hdiag, *, gptq, act_order, timer, factor):
        res = quantize_for_type(W, H, hdiag, self.qtype, gptq=gptq, act_order=act_order, timer=timer, factor=factor)
        return GGUFLinear(torch.from_numpy(res.data), self.qtype, tuple(W.shape), hdiag.cpu()), res.deq.to(W.device)


class GGUFBlocks:
    """The GGUF block types as the master reads its GGUFLinear records (neuqi_export.master.BlockFormat)."""

    @staticmethod
    def row_bytes(qtype: str, n: int) -> int:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
        return n // block * size

    @staticmethod
    def dequantize(data: np.ndarray, qtype: str) -> np.ndarray:
        return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])


grids.register("gguf", GGUFGrid)  # the pipeline asks for "gguf" grids by type name (QuantizeOptions.gguf_types)
register_blocks(GGUFLinear.kind, GGUFBlocks)  # the master reads GGUFLinear records through it
