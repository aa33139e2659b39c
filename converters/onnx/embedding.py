"""The embedding of a tied, quantized output head: `com.microsoft::GatherBlockQuantized` on the head's weights.

When the master quantizes a tied head (`quantize --lm-head-bits`), the embedding table is that one matrix. The
op (onnxruntime contrib, since 1.20) gathers rows of a block-quantized uint8 matrix (bits 4 or 8, blocks along
the row, a ragged last block allowed) and dequantizes them as (code - zero_point) * scale. Its layout is the
row-major form of MatMulNBits' B (N, k_blocks, blob) and its packed uint8 zero points are MatMulNBits' too, so a
4- or 8-bit head shares B, scales and zero points with the lm_head node (a Reshape of B, no second copy);
2-bit codes get their own 4-bit copy (the op has no 2-bit form). Like MatMulNBits it takes integer zero
points only, so the float zero point Z is written as R = clamp(round(Z)) plus the exact per-group correction
s (R - Z), gathered per token and spread over the group's columns.
"""
from __future__ import annotations

import numpy as np

from .matmulnbits import group_sum_matrix, pack_codes, pack_zero_points

GATHER_BITS = (4, 8)


def quantized_embedding(graph, module: str) -> str:
    """Adds the nodes that embed `input_ids` with the quantized linear `module` of `graph` (a DecoderGraph);
    returns the (batch, seq, hidden) output in the graph's dtype, equal to Gather(dequant(W)) up to float rounding."""
    b = graph.b
    lin = graph.master.linears[module]
    w, (B, scales, zps) = graph.nbits(module)
    N, K, bs, kb = w.N, w.K, w.block_size, w.k_blocks
    bits = w.bits if w.bits in GATHER_BITS else 4
    if bits == w.bits:
        data = b.op("Reshape", [B, b.i64(N, -1)], f"{module}/gather_data")
    else:
        codes = lin.codes.cpu().numpy().astype(np.uint8)
        data = b.init(f"{module}.gather_data", pack_codes(codes, bits, bs).reshape(N, -1))
    if bits == w.bits and w.zero_point_form != "float":
        zp, D = zps, w.correction  # the head's own uint8 zero points and correction (n_groups, N)
    else:
        scale = lin.scale.detach().cpu().numpy().astype(np.float64)
        zero = lin.zero.detach().cpu().numpy().astype(np.float64)
        R = np.clip(np.round(zero), 0, (1 << bits) - 1)
        block_group = (np.arange(kb) * bs) // w.group_size
        zp = b.init(f"{module}.gather_zero_points", pack_zero_points(R[:, block_group].astype(np.uint8), bits))
        D = (scale * (R - zero)).T.astype(np.float32)
        D = D if np.any(D) else None
    x = b.op("GatherBlockQuantized", [data, "input_ids", scales, zp], "embed_tokens/GatherBlockQuantized",
             domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=bs, bits=bits)
    if kb * bs != K:  # the ragged last block's padding columns
        x = b.op("Slice", [x, b.i64(0), b.i64(K), b.i64(-1)], "embed_tokens/slice")
    if D is not None:  # s (R - Z) of the token's groups, spread over each group's columns
        corr = b.op("Gather", [b.init(f"{module}.gather_correction", np.ascontiguousarray(D.T).astype(b.np)), "input_ids"],
                    "embed_tokens/correction", axis=0)
        spread = b.init(f"group_spread.K{K}.G{w.group_size}", group_sum_matrix(K, w.group_size, b.np).T.copy())
        x = b.op("Add", [x, b.op("MatMul", [corr, spread], "embed_tokens/spread")], "embed_tokens/add_correction")
    return x
