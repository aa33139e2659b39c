"""Masks and attention of the decoder graph, spelled out with plain ONNX ops in transformers' eager order.

allowed(j | i) = attention_mask[j] and j <= past + i, and j > past + i - window on a sliding-window layer;
scores = q kᵀ * scale, soft-capped as cap * tanh(scores / cap) where the family caps them, masked, softmax in
float32; the kv heads are shared by heads / kv_heads query heads (regrouped by a reshape, no copy of K/V).
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto


class Masks:
    """The (batch, 1, seq, total) boolean masks of allowed keys, one per attention window, made on first use."""

    def __init__(self, b, past_key: str):
        self.b = b
        past_len = b.op("Shape", [past_key], "mask/past_len", start=2, end=3)
        seq_len = b.op("Shape", ["input_ids"], "mask/seq_len", start=1, end=2)
        total = b.op("Add", [past_len, seq_len], "mask/total")
        zero, one = b.const(0, np.int64), b.const(1, np.int64)
        past_s = b.op("Squeeze", [past_len, b.i64(0)], "mask/past_s")
        total_s = b.op("Squeeze", [total, b.i64(0)], "mask/total_s")
        self.kv_idx = b.op("Range", [zero, total_s, one], "mask/kv_idx")
        self.q_idx = b.op("Unsqueeze", [b.op("Range", [past_s, total_s, one], "mask/q_range"), b.i64(1)], "mask/q_idx")
        causal = b.op("LessOrEqual", [self.kv_idx, self.q_idx], "mask/causal")
        pad = b.op("Cast", ["attention_mask"], "mask/pad_bool", to=TensorProto.BOOL)
        self.pad = b.op("Unsqueeze", [pad, b.i64(1, 2)], "mask/pad_u")
        self._masks = {None: b.op("And", [self.pad, causal], "mask/allowed")}  # (batch, 1, seq, total)

    def allowed(self, window: int | None) -> str:
        """Keys a query may attend to, within the last `window` positions (None: all earlier ones)."""
        if window not in self._masks:
            b = self.b
            lo = b.op("Sub", [self.q_idx, b.const(int(window), np.int64)], f"mask/window{window}_lo")
            inside = b.op("Greater", [self.kv_idx, lo], f"mask/window{window}")
            self._masks[window] = b.op("And", [self._masks[None], inside], f"mask/allowed_w{window}")
        return self._masks[window]


def attend(b, q: str, k: str, v: str, allowed: str, heads: int, kv_heads: int, head_dim: int, scale: float,
           softcap: float | None, name: str) -> str:
    """softmax(q kᵀ * scale [soft-capped], masked) v for q (b, H, s, hd), k / v (b, kvH, total, hd);
    returns (b, s, H * hd)."""
    qg = b.op("Reshape", [q, b.i64(0, kv_heads, -1, head_dim)], f"{name}/q_groups")  # (b, kvh, rep*seq, hd)
    kt = b.op("Transpose", [k], f"{name}/k_T", perm=[0, 1, 3, 2])
    s = b.op("Mul", [b.op("MatMul", [qg, kt], f"{name}/qk"), b.const(scale, b.np)], f"{name}/qk_scaled")
    s = b.op("Reshape", [s, b.i64(0, heads, -1, 0)], f"{name}/scores")  # (b, H, seq, total)
    if softcap:
        cap = b.const(float(softcap), b.np)
        s = b.op("Mul", [b.op("Tanh", [b.op("Div", [s, cap], f"{name}/cap_div")], f"{name}/cap_tanh"), cap],
                 f"{name}/softcapped")
    s = b.to_float(s, f"{name}/scores")
    s = b.op("Where", [allowed, s, b.const(np.finfo(np.float32).min, np.float32)], f"{name}/masked")
    a = b.to_model(b.op("Softmax", [s], f"{name}/softmax", axis=-1), f"{name}/probs")
    a = b.op("Reshape", [a, b.i64(0, kv_heads, -1, 0)], f"{name}/probs_groups")
    o = b.op("MatMul", [a, v], f"{name}/pv")  # (b, kvh, rep*seq, hd)
    o = b.op("Reshape", [o, b.i64(0, heads, -1, head_dim)], f"{name}/o_heads")
    o = b.op("Transpose", [o], f"{name}/o_t", perm=[0, 2, 1, 3])
    return b.op("Reshape", [o, b.i64(0, 0, heads * head_dim)], f"{name}/o_flat")
