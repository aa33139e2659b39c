"""The embedding of a tied, quantized output head: `com.microsoft::GatherBlockQuantized` on the head's weights.

When the master quantizes a tied head (`quantize --lm-head-bits`), the embedding table is that one matrix. The
op (onnxruntime contrib, since 1.20) gathers rows of a block-quantized uint8 matrix (bits 4 or 8, blocks along
the row, a ragged last block allowed) and dequantizes them as (code - zero_point) * scale. Its layout is the
row-major form of MatMulNBits' B (N, k_blocks, blob) and its packed uint8 zero points are MatMulNBits' too, so a
4- or 8-bit head shares B, scales, zero points and the correction below with the lm_head node (a Reshape of
B, no second copy); 2-bit codes get their own 4-bit copy (the op has no 2-bit form), packed by the same
`matmulnbits.prepare`. Like MatMulNBits it takes integer zero
points only, so the float zero point Z is written as R = clamp(round(Z)) plus the exact per-group correction
s (R - Z), gathered per token and spread over the group's columns.
"""
from __future__ import annotations

from .matmulnbits import group_sum_matrix, prepare

GATHER_BITS = (4, 8)


def quantized_embedding(graph, module: str) -> str:
    """Adds the nodes that embed `input_ids` with the quantized linear `module` of `graph` (a DecoderGraph);
    returns the (batch, seq, hidden) output in the graph's dtype, equal to Gather(dequant(W)) up to float rounding."""
    b = graph.b
    w, (B, scales, zps), corr = graph.nbits(module)
    N, K, bs, kb = w.N, w.K, w.block_size, w.k_blocks
    bits = w.bits if w.bits in GATHER_BITS else 4
    # the head's own uint8 zero points and correction when it has them, else the same packing in the gather's
    # container (2-bit codes in 4 bits; the float zero-point form written as uint8 + correction)
    g = w if bits == w.bits and w.zero_point_form != "float" else prepare(graph.master.linears[module], "fast", bits)
    data = (b.op("Reshape", [B, b.i64(N, -1)], f"{module}/gather_data") if bits == w.bits
            else b.init(f"{module}.gather_data", g.B.reshape(N, -1)))
    if g is not w:
        zps = b.init(f"{module}.gather_zero_points", g.zero_points)
        corr = None if g.correction is None else b.init(f"{module}.gather_correction", g.correction.astype(b.np))
    x = b.op("GatherBlockQuantized", [data, "input_ids", scales, zps], "embed_tokens/GatherBlockQuantized",
             domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=bs, bits=bits)
    if kb * bs != K:  # the ragged last block's padding columns
        x = b.op("Slice", [x, b.i64(0), b.i64(K), b.i64(-1)], "embed_tokens/slice")
    if corr is not None:  # s (R - Z) of the token's groups (columns of the (n_groups, N) correction), spread over
        # each group's columns
        c = b.op("Gather", [corr, "input_ids"], "embed_tokens/correction", axis=1)  # (n_groups, batch, seq)
        c = b.op("Transpose", [c], "embed_tokens/correction_t", perm=[1, 2, 0])
        spread = b.init(f"group_spread.K{K}.G{w.group_size}", group_sum_matrix(K, w.group_size, b.np).T.copy())
        x = b.op("Add", [x, b.op("MatMul", [c, spread], "embed_tokens/spread")], "embed_tokens/add_correction")
    return x
