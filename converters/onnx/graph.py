"""The decoder graph (llama / mistral / qwen2) as an ONNX model built with onnx.helper.

Inputs (names as onnxruntime-genai expects):
    input_ids int64 (batch, seq); attention_mask int64 (batch, total_seq); position_ids int64 (batch, seq);
    past_key_values.{i}.key / .value  T (batch, kv_heads, past_seq, head_dim)
Outputs:
    logits T (batch, seq, vocab); present.{i}.key / .value  T (batch, kv_heads, total_seq, head_dim)
with T = float32 or float16 (`dtype`); total_seq = past_seq + seq.

Ops: standard ONNX (opset 17) everywhere except the quantized linears (com.microsoft MatMulNBits,
version 1) and, when a tied output head is quantized, the embedding (com.microsoft GatherBlockQuantized on the
head's weights, `embedding.py`). RMSNorm, rotary embedding, grouped-query attention and the causal/padding mask are spelled
out with plain ops so that the graph's numerics follow transformers' eager code:
- RMSNorm in float32: x / sqrt(mean(x²) + eps), cast back to T, times the weight (onnxruntime fuses it
  into SimplifiedLayerNormalization);
- rotary: inv_freq computed like transformers (float32), angles = position * inv_freq in float32,
  cos/sin of cat(angles, angles), `q*cos + rotate_half(q)*sin`;
- attention: softmax(q kᵀ * head_dim^-0.5 masked) v in float32 softmax; the kv heads are shared by
  `heads / kv_heads` query heads (the query heads are regrouped by a reshape, no copy of K/V);
  allowed(j | i) = attention_mask[j] and j <= past + i (and j > past + i - window with a sliding window).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neuqi_export.errors import UserError
from neuqi_export.master import EMBED, HEAD

from .embedding import quantized_embedding
from .matmulnbits import NBitsWeights, group_sum_matrix, prepare

ONNX_OPSET = 17
MS_OPSET = 1
IR_VERSION = 8
MIN_ORT_VERSION = "1.28"
SUPPORTED = ("llama", "mistral", "qwen2")

_NP = {"fp32": np.float32, "fp16": np.float16}
_TP = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}


# ----------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------

def rope_settings(cfg: dict) -> dict:
    """{'theta', 'type', plus the type's fields}: transformers 5 keeps them in rope_parameters; 4.x in
    rope_theta / rope_scaling."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    if "rope_theta" not in params:
        params["rope_theta"] = cfg.get("rope_theta", 10000.0)
    for k, v in legacy.items():
        params.setdefault(k, v)
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    params["rope_type"] = rtype
    return params


def inv_freq(cfg: dict, head_dim: int) -> tuple[np.ndarray, float]:
    """(inv_freq float32 (head_dim/2,), attention_scaling) the way transformers computes them."""
    import torch

    p = rope_settings(cfg)
    base = float(p["rope_theta"])
    partial = float(cfg.get("partial_rotary_factor", p.get("partial_rotary_factor", 1.0)) or 1.0)
    if partial != 1.0:
        raise UserError(f"partial_rotary_factor={partial} is not supported by the ONNX exporter; export a model with full rotary embeddings")
    dim = head_dim
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    rtype = p["rope_type"]
    if rtype == "default":
        pass
    elif rtype == "linear":
        inv = inv / float(p["factor"])
    elif rtype == "llama3":
        factor = float(p["factor"])
        lo, hi = float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        low_wl, high_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_wl) * ~(wavelen > low_wl)
        inv = torch.where(is_medium, smoothed, inv_l)
    else:
        raise UserError(f"rope_type '{rtype}' is not supported by the ONNX exporter (default, linear, llama3 are); "
                        "export a model with one of those")
    return inv.to(torch.float32).numpy(), 1.0


def sliding_window(cfg: dict) -> int | None:
    w = cfg.get("sliding_window")
    if not w:
        return None
    mt = cfg.get("model_type")
    if mt == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    if mt == "qwen2":
        raise UserError("qwen2 with use_sliding_window=true (per-layer windows) is not supported by the ONNX exporter; "
                        "export a model without it")
    return int(w)


class ModelDims:
    def __init__(self, cfg: dict):
        mt = cfg.get("model_type")
        if mt not in SUPPORTED:
            raise UserError(f"model_type '{mt}' is not supported by the ONNX exporter; supported: {', '.join(SUPPORTED)}")
        self.model_type = mt
        self.hidden = int(cfg["hidden_size"])
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = int(cfg.get("head_dim") or self.hidden // self.heads)
        self.vocab = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.window = sliding_window(cfg)
        if self.heads % self.kv_heads:
            raise UserError(f"num_attention_heads={self.heads} is not a multiple of num_key_value_heads={self.kv_heads}; the config is broken")
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise UserError(f"hidden_act '{cfg.get('hidden_act')}' is not supported by the ONNX exporter (silu is)")


# ----------------------------------------------------------------------------------------------------
# a small graph builder
# ----------------------------------------------------------------------------------------------------

class Builder:
    def __init__(self, dtype: str):
        self.dtype = dtype
        self.np = _NP[dtype]
        self.tp = _TP[dtype]
        self.nodes: list = []
        self.inits: list = []
        self._names: set = set()
        self._consts: dict = {}
        self.init_bytes = 0

    def name(self, base: str) -> str:
        n, i = base, 0
        while n in self._names:
            i += 1
            n = f"{base}_{i}"
        self._names.add(n)
        return n

    def init(self, name: str, arr: np.ndarray) -> str:
        name = self.name(name)
        arr = np.ascontiguousarray(arr)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.init_bytes += arr.nbytes
        return name

    def const(self, value, dtype) -> str:
        """A small shared constant initializer."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def i64(self, *values) -> str:
        return self.const(list(values), np.int64)

    def op(self, op_type: str, inputs: list, name: str | None = None, domain: str | None = None, n_out: int = 1, **attrs):
        base = name or op_type
        node_name = self.name(f"/{base}")
        outs = [self.name(f"{node_name}/out{k}") for k in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=node_name, **kw, **attrs))
        return outs[0] if n_out == 1 else outs

    def op_to(self, op_type: str, inputs: list, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.name(f"/{output}"), **attrs))
        return output


# ----------------------------------------------------------------------------------------------------
# the decoder
# ----------------------------------------------------------------------------------------------------

class DecoderGraph:
    def __init__(self, master, dtype: str = "fp32", zero_point: str = "fast", accuracy_level: int = 4):
        if dtype not in _NP:
            raise UserError(f"--dtype {dtype} is not supported for ONNX; use fp32 or fp16")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"accuracy_level {accuracy_level} is invalid; use 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        self.master = master
        self.cfg = master.config
        self.d = ModelDims(self.cfg)
        self.zero_point = zero_point
        self.accuracy_level = int(accuracy_level)
        self.b = Builder(dtype)
        self.reports: list = []  # (name, NBitsWeights)
        self._group_sums: dict = {}
        self._gsum_mats: dict = {}
        self._nbits: dict = {}

    # tensors of the master ------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        t = self.master.tensors.get(name)
        if t is None:
            raise UserError(f"master checkpoint has no tensor '{name}'; re-run quantize")
        return t.detach().float().cpu().numpy()

    def weight_init(self, name: str, arr: np.ndarray) -> str:
        return self.b.init(name, arr.astype(self.b.np))

    # building blocks --------------------------------------------------------------------------------
    def rms_norm(self, x: str, weight: str, name: str) -> str:
        b = self.b
        w = self.weight_init(weight, self.tensor(weight))
        xf = b.op("Cast", [x], f"{name}/cast_in", to=TensorProto.FLOAT) if b.dtype != "fp32" else x
        # Pow -> ReduceMean -> Add -> Sqrt -> Div: the pattern onnxruntime fuses into SimplifiedLayerNormalization
        sq = b.op("Pow", [xf, b.const(2.0, np.float32)], f"{name}/sq")
        var = b.op("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [var, b.const(self.d.eps, np.float32)], f"{name}/add_eps")], f"{name}/sqrt")
        normed = b.op("Div", [xf, std], f"{name}/scale")
        if b.dtype != "fp32":
            normed = b.op("Cast", [normed], f"{name}/cast_out", to=b.tp)
        return b.op("Mul", [w, normed], f"{name}/weight")

    def _group_sum(self, x: str, K: int, G: int) -> str:
        key = (x, K, G)
        if key not in self._group_sums:
            mk = (K, G)
            if mk not in self._gsum_mats:
                self._gsum_mats[mk] = self.b.init(f"group_sum.K{K}.G{G}", group_sum_matrix(K, G, self.b.np))
            self._group_sums[key] = self.b.op("MatMul", [x, self._gsum_mats[mk]], f"group_sum_K{K}_G{G}")
        return self._group_sums[key]

    def nbits(self, module: str) -> tuple[NBitsWeights, list, str | None]:
        """A master linear's MatMulNBits weights, their initializers [B, scales, zero_points] and that of the
        zero-point correction (None without one), made once (the quantized embedding of a tied head shares them)."""
        if module not in self._nbits:
            b = self.b
            w: NBitsWeights = prepare(self.master.linears[module], self.zero_point)
            self.reports.append((module, w))
            zp = w.zero_points if w.zero_points.dtype == np.uint8 else w.zero_points.astype(b.np)
            inits = [b.init(f"{module}.qweight", w.B), b.init(f"{module}.scales", w.scales.astype(b.np)),
                     b.init(f"{module}.zero_points", zp)]
            corr = None if w.correction is None else b.init(f"{module}.zp_correction", w.correction.astype(b.np))
            self._nbits[module] = (w, inits, corr)
        return self._nbits[module]

    def linear(self, x: str, module: str) -> str:
        b = self.b
        if module in self.master.linears:
            w, inits, corr_init = self.nbits(module)
            ins = [x, *inits]
            y = b.op("MatMulNBits", ins, f"{module}/MatMulNBits", domain="com.microsoft", K=w.K, N=w.N, bits=w.bits,
                     block_size=w.block_size, accuracy_level=self.accuracy_level)
            if corr_init is not None:
                corr = b.op("MatMul", [self._group_sum(x, w.K, w.group_size), corr_init], f"{module}/zp_correction")
                y = b.op("Add", [y, corr], f"{module}/add_correction")
        else:
            wt = self.tensor(f"{module}.weight")
            y = b.op("MatMul", [x, self.weight_init(f"{module}.weight_t", wt.T)], f"{module}/MatMul")
        if f"{module}.bias" in self.master.tensors:
            y = b.op("Add", [y, self.weight_init(f"{module}.bias", self.tensor(f"{module}.bias"))], f"{module}/bias")
        return y

    def rotate(self, x: str, cos: str, sin: str, name: str) -> str:
        b, half = self.b, self.d.head_dim // 2
        x1, x2 = b.op("Split", [x, b.i64(half, half)], f"{name}/split", n_out=2, axis=-1)
        rot = b.op("Concat", [b.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate_half", axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos], f"{name}/mul_cos"), b.op("Mul", [rot, sin], f"{name}/mul_sin")], f"{name}/rope")

    def build(self) -> onnx.ModelProto:
        b, d = self.b, self.d
        T = b.tp
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", T, ["batch_size", "sequence_length", d.vocab])]
        for i in range(d.layers):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", T,
                                                            ["batch_size", d.kv_heads, "past_sequence_length", d.head_dim]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", T,
                                                             ["batch_size", d.kv_heads, "total_sequence_length", d.head_dim]))
        for n in ("input_ids", "attention_mask", "position_ids"):
            b._names.add(n)
        for vi in inputs[3:] + outputs:
            b._names.add(vi.name)

        # embedding
        if self.master.head_shares_embedding:  # the tied head is quantized: gather from its MatMulNBits weights
            x = quantized_embedding(self, HEAD)
        else:
            emb = self.weight_init(EMBED, self.tensor(EMBED))
            x = b.op("Gather", [emb, "input_ids"], "embed_tokens", axis=0)

        # rotary tables (batch, 1, seq, head_dim)
        inv, att_scale = inv_freq(self.cfg, d.head_dim)
        pos = b.op("Unsqueeze", [b.op("Cast", ["position_ids"], "rope/pos_f", to=TensorProto.FLOAT), b.i64(-1)], "rope/pos_u")
        ang = b.op("Mul", [pos, b.init("rope.inv_freq", inv)], "rope/angles")
        ang = b.op("Concat", [ang, ang], "rope/cat", axis=-1)
        cos, sin = b.op("Cos", [ang], "rope/cos"), b.op("Sin", [ang], "rope/sin")
        if att_scale != 1.0:
            cos = b.op("Mul", [cos, b.const(att_scale, np.float32)], "rope/cos_s")
            sin = b.op("Mul", [sin, b.const(att_scale, np.float32)], "rope/sin_s")
        if b.dtype != "fp32":
            cos, sin = b.op("Cast", [cos], "rope/cos_t", to=T), b.op("Cast", [sin], "rope/sin_t", to=T)
        cos = b.op("Unsqueeze", [cos, b.i64(1)], "rope/cos_u")
        sin = b.op("Unsqueeze", [sin, b.i64(1)], "rope/sin_u")

        # mask (batch, 1, seq, total) of allowed positions
        past_len = b.op("Shape", ["past_key_values.0.key"], "mask/past_len", start=2, end=3)
        seq_len = b.op("Shape", ["input_ids"], "mask/seq_len", start=1, end=2)
        total = b.op("Add", [past_len, seq_len], "mask/total")
        zero, one = b.const(0, np.int64), b.const(1, np.int64)
        past_s = b.op("Squeeze", [past_len, b.i64(0)], "mask/past_s")
        total_s = b.op("Squeeze", [total, b.i64(0)], "mask/total_s")
        kv_idx = b.op("Range", [zero, total_s, one], "mask/kv_idx")
        q_idx = b.op("Unsqueeze", [b.op("Range", [past_s, total_s, one], "mask/q_range"), b.i64(1)], "mask/q_idx")
        allowed = b.op("LessOrEqual", [kv_idx, q_idx], "mask/causal")
        if d.window:
            lo = b.op("Sub", [q_idx, b.const(d.window, np.int64)], "mask/window_lo")
            allowed = b.op("And", [allowed, b.op("Greater", [kv_idx, lo], "mask/window")], "mask/and_window")
        pad = b.op("Cast", ["attention_mask"], "mask/pad_bool", to=TensorProto.BOOL)
        pad = b.op("Unsqueeze", [pad, b.i64(1, 2)], "mask/pad_u")
        allowed = b.op("And", [pad, allowed], "mask/allowed")  # (batch, 1, seq, total)
        neg = b.const(np.finfo(np.float32).min, np.float32)

        scaling = b.const(d.head_dim ** -0.5, b.np)
        for i in range(d.layers):
            p = f"model.layers.{i}"
            h = self.rms_norm(x, f"{p}.input_layernorm.weight", f"{p}/input_layernorm")
            q = self.linear(h, f"{p}.self_attn.q_proj")
            k = self.linear(h, f"{p}.self_attn.k_proj")
            v = self.linear(h, f"{p}.self_attn.v_proj")
            q = b.op("Transpose", [b.op("Reshape", [q, b.i64(0, 0, d.heads, d.head_dim)], f"{p}/q_r")], f"{p}/q_t", perm=[0, 2, 1, 3])
            k = b.op("Transpose", [b.op("Reshape", [k, b.i64(0, 0, d.kv_heads, d.head_dim)], f"{p}/k_r")], f"{p}/k_t", perm=[0, 2, 1, 3])
            v = b.op("Transpose", [b.op("Reshape", [v, b.i64(0, 0, d.kv_heads, d.head_dim)], f"{p}/v_r")], f"{p}/v_t", perm=[0, 2, 1, 3])
            q = self.rotate(q, cos, sin, f"{p}/q")
            k = self.rotate(k, cos, sin, f"{p}/k")
            pk = b.op_to("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
            pv = b.op_to("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
            qg = b.op("Reshape", [q, b.i64(0, d.kv_heads, -1, d.head_dim)], f"{p}/q_groups")  # (b, kvh, rep*seq, hd)
            kt = b.op("Transpose", [pk], f"{p}/k_T", perm=[0, 1, 3, 2])
            s = b.op("Mul", [b.op("MatMul", [qg, kt], f"{p}/qk"), scaling], f"{p}/qk_scaled")
            s = b.op("Reshape", [s, b.i64(0, d.heads, -1, 0)], f"{p}/scores")  # (b, H, seq, total)
            if b.dtype != "fp32":
                s = b.op("Cast", [s], f"{p}/scores_f", to=TensorProto.FLOAT)
            s = b.op("Where", [allowed, s, neg], f"{p}/masked")
            a = b.op("Softmax", [s], f"{p}/softmax", axis=-1)
            if b.dtype != "fp32":
                a = b.op("Cast", [a], f"{p}/probs_t", to=T)
            a = b.op("Reshape", [a, b.i64(0, d.kv_heads, -1, 0)], f"{p}/probs_groups")
            o = b.op("MatMul", [a, pv], f"{p}/pv")  # (b, kvh, rep*seq, hd)
            o = b.op("Reshape", [o, b.i64(0, d.heads, -1, d.head_dim)], f"{p}/o_heads")
            o = b.op("Transpose", [o], f"{p}/o_t", perm=[0, 2, 1, 3])
            o = b.op("Reshape", [o, b.i64(0, 0, d.heads * d.head_dim)], f"{p}/o_flat")
            x = b.op("Add", [x, self.linear(o, f"{p}.self_attn.o_proj")], f"{p}/residual_attn")
            h = self.rms_norm(x, f"{p}.post_attention_layernorm.weight", f"{p}/post_attention_layernorm")
            gate = self.linear(h, f"{p}.mlp.gate_proj")
            up = self.linear(h, f"{p}.mlp.up_proj")
            act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{p}/sigmoid")], f"{p}/silu"), up], f"{p}/swiglu")
            x = b.op("Add", [x, self.linear(act, f"{p}.mlp.down_proj")], f"{p}/residual_mlp")

        h = self.rms_norm(x, "model.norm.weight", "model/norm")
        if "lm_head" in self.master.linears:
            y = self.linear(h, "lm_head")
            b.op_to("Identity", [y], "logits")
        else:
            if d.tied or "lm_head.weight" not in self.master.tensors:
                if not d.tied:
                    raise UserError("master checkpoint has no lm_head.weight and the config does not tie it; re-run quantize")
                head = emb
            else:
                head = self.weight_init("lm_head.weight", self.tensor("lm_head.weight"))
            h2 = b.op("Reshape", [h, b.i64(-1, d.hidden)], "lm_head/flatten")
            y = b.op("Gemm", [h2, head], "lm_head/Gemm", transB=1)
            shape = b.op("Concat", [b.op("Shape", ["input_ids"], "lm_head/shape_ids"), b.i64(d.vocab)], "lm_head/shape", axis=0)
            b.op_to("Reshape", [y, shape], "logits")

        graph = helper.make_graph(b.nodes, "neuqi_decoder", inputs, outputs, b.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                        helper.make_opsetid("com.microsoft", MS_OPSET)],
                                  producer_name="neuqi-export", producer_version="0.1.0")
        model.ir_version = IR_VERSION
        return model
