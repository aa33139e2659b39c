"""The decoder graph of any registered family (neuqi_export.archs) as an ONNX model built with onnx.helper.

Inputs (names as onnxruntime-genai expects):
    input_ids int64 (batch, seq); attention_mask int64 (batch, total_seq); position_ids int64 (batch, seq);
    past_key_values.{i}.key / .value  T (batch, kv_heads_i, past_seq, head_dim_i)
Outputs:
    logits T (batch, seq, vocab); present.{i}.key / .value  T (batch, kv_heads_i, total_seq, head_dim_i)
with T = float32 or float16 (`dtype`); total_seq = past_seq + seq. Every layer keeps its whole past; a
sliding-window layer masks the keys older than its window.

Ops: standard ONNX (opset 17; a mixture-of-experts block as in `moe.py`) except the quantized linears
(com.microsoft MatMulNBits, version 1) and, when a tied output head is quantized, the embedding (com.microsoft GatherBlockQuantized, `embedding.py`). Every fact
about the model comes from its Family entry: the block's norms by role (pre / post norms, q/k norms over a head
or the full width), the norm offset (Gemma: x̂ (1 + w)), fused projections split by rows, the activation, the
embedding / attention / residual / logit scales, the soft-caps, and each layer's window and rotary settings
(`rope.py`; NoPE layers have none). The numerics follow transformers' eager code:
- RMSNorm in float32: x / sqrt(mean(x²) + eps), cast back to T, times the weight (a norm with an offset
  multiplies by (offset + w) in float32 before the cast, as Gemma does);
- attention as in `attention.py`; the embedding scale is applied in T, as transformers does.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from neuqi_export.archs import family_for, head_dim
from neuqi_export.errors import UserError

from .attention import Masks, attend
from .builder import NP_DTYPES, Builder
from .embedding import quantized_embedding
from .matmulnbits import NBitsWeights, group_sum_matrix, prepare, without_arrays
from .moe import moe_mlp, routing
from .rope import cos_sin, rope_spec, rotate

ONNX_OPSET = 17
MS_OPSET = 1
IR_VERSION = 8
MIN_ORT_VERSION = "1.28"


class ModelDims:
    """The sizes and per-layer attention of a config, read through its Family; UserError for what the graph
    cannot express."""

    def __init__(self, cfg: dict):
        fam = self.family = family_for(cfg)
        self.model_type = fam.model_type
        self.hidden = int(cfg["hidden_size"])
        self.layers = int(cfg["num_hidden_layers"])
        self.heads = int(cfg["num_attention_heads"])
        self.kv_heads = int(cfg.get("num_key_value_heads") or self.heads)
        self.head_dim = head_dim(cfg)
        self.vocab = int(cfg["vocab_size"])
        self.eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        if self.heads % self.kv_heads:
            raise UserError(f"num_attention_heads={self.heads} is not a multiple of num_key_value_heads={self.kv_heads}; "
                            "the config is broken")
        if cfg.get("use_bidirectional_attention"):
            raise UserError(f"{fam.model_type}: bidirectional attention is not supported by the ONNX exporter (its graph "
                            "is causal); export this model to another format")
        self.activation = fam.activation(cfg)
        self.attention = fam.layer_attention(cfg)
        self.rope = [None if la.rope is None else rope_spec(cfg, la.rope, self.head_dim) for la in self.attention]
        self.kv = [(self.kv_heads, self.head_dim)] * self.layers  # (kv heads, head dim) of each layer's cache
        self.embedding_scale = float(fam.embedding_scale(cfg))
        self.attention_scale = float(fam.attention_scale(cfg))
        self.residual_scale = float(fam.residual_scale(cfg))
        self.logit_scale = float(fam.logit_scale(cfg))
        self.attn_softcap, self.final_softcap = fam.attn_softcap(cfg), fam.final_softcap(cfg)


def check_config(cfg: dict) -> None:
    """UserError (one line) when the graph cannot express this HF config; nothing otherwise."""
    d = ModelDims(cfg)
    if d.family.experts is not None:
        routing(cfg, d.family)


class DecoderGraph:
    def __init__(self, master, dtype: str = "fp32", zero_point: str = "fast", accuracy_level: int = 4,
                 float_storage: str = "half", sink=None):
        if dtype not in NP_DTYPES:
            raise UserError(f"--dtype {dtype} is not supported for ONNX; use fp32 or fp16")
        if accuracy_level not in (0, 1, 2, 3, 4):
            raise UserError(f"accuracy_level {accuracy_level} is invalid; use 0 (unset), 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
        self.master = master
        self.cfg = master.config
        self.d = ModelDims(self.cfg)
        self.fam = self.d.family
        self.zero_point = zero_point
        self.accuracy_level = int(accuracy_level)
        self.b = Builder(dtype, float_storage, sink)  # sink: builder.ExternalData (initializers written as made)
        self.reports: list = []  # (name, NBitsWeights)
        self._group_sums: dict = {}
        self._gsum_mats: dict = {}
        self._nbits: dict = {}
        self._fused_out: dict = {}

    # tensors of the master ------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        t = self.master.tensors.get(name)
        if t is None:
            raise UserError(f"master checkpoint has no tensor '{name}'; re-run quantize")
        return t.detach().float().cpu().numpy()

    def weight_init(self, name: str, arr: np.ndarray) -> str:
        """A float weight of the master in the graph's dtype (builder.float_weight: lossless half storage)."""
        return self.b.float_weight(name, arr)

    def has_linear(self, module: str) -> bool:
        return module in self.master.linears or f"{module}.weight" in self.master.tensors

    # building blocks --------------------------------------------------------------------------------
    def rms_norm(self, x: str, weight: str, name: str) -> str:
        """RMSNorm over the last axis with the master tensor `weight` (and the family's norm offset)."""
        b = self.b
        xf = b.to_float(x, name)
        # Pow -> ReduceMean -> Add -> Sqrt -> Div: the pattern onnxruntime fuses into SimplifiedLayerNormalization
        sq = b.op("Pow", [xf, b.const(2.0, np.float32)], f"{name}/sq")
        var = b.op("ReduceMean", [sq], f"{name}/mean", axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [var, b.const(self.d.eps, np.float32)], f"{name}/add_eps")], f"{name}/sqrt")
        normed = b.op("Div", [xf, std], f"{name}/scale")
        offset = self.fam.norm_offset
        if offset:  # (offset + w) in float32, then the cast (Gemma's order)
            t = self.tensor(weight)  # float32 in the graph either way: lossless half storage in fp32 graphs
            w = b.float_weight(weight, t) if b.dtype == "fp32" else b.init(weight, t.astype(np.float32))
            w = b.op("Add", [w, b.const(offset, np.float32)], f"{name}/offset")
            return b.to_model(b.op("Mul", [normed, w], f"{name}/weight"), name)
        return b.op("Mul", [self.weight_init(weight, self.tensor(weight)), b.to_model(normed, name)], f"{name}/weight")

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
            zp = w.zero_points if w.zero_points.dtype == np.uint8 else w.zero_points.astype(b.np)
            inits = [b.init(f"{module}.qweight", w.B), b.init(f"{module}.scales", w.scales.astype(b.np)),
                     b.init(f"{module}.zero_points", zp)]
            corr = None if w.correction is None else b.init(f"{module}.zp_correction", w.correction.astype(b.np))
            if b.sink is not None:  # written: keep the shapes, not the bytes
                w = without_arrays(w)
            self.reports.append((module, w))
            self._nbits[module] = (w, inits, corr)
        return self._nbits[module]

    def linear(self, x: str, module: str) -> str:
        """x @ Wᵀ (+ bias) for the master linear `module` (MatMulNBits when quantized, MatMul when float)."""
        b = self.b
        if module in self.master.linears:
            w, inits, corr_init = self.nbits(module)
            y = b.op("MatMulNBits", [x, *inits], f"{module}/MatMulNBits", domain="com.microsoft", K=w.K, N=w.N,
                     bits=w.bits, block_size=w.block_size, accuracy_level=self.accuracy_level)
            if corr_init is not None:
                corr = b.op("MatMul", [self._group_sum(x, w.K, w.group_size), corr_init], f"{module}/zp_correction")
                y = b.op("Add", [y, corr], f"{module}/add_correction")
        else:
            wt = self.tensor(f"{module}.weight")
            y = b.op("MatMul", [x, self.weight_init(f"{module}.weight_t", wt.T)], f"{module}/MatMul")
        if f"{module}.bias" in self.master.tensors:
            y = b.op("Add", [y, self.weight_init(f"{module}.bias", self.tensor(f"{module}.bias"))], f"{module}/bias")
        return y

    def projection(self, x: str, prefix: str, name: str) -> str:
        """The output of linear `name` (e.g. 'self_attn.q_proj') of block `prefix`: its own linear, or its rows of
        the family's fused projection (a fused qkv_proj) split once."""
        if self.has_linear(f"{prefix}.{name}"):
            return self.linear(x, f"{prefix}.{name}")
        parent, leaf = name.rsplit(".", 1)
        for fused, parts_of in self.fam.fused.items():
            parts = parts_of(self.cfg)
            names = [p for p, _ in parts]
            if fused.rsplit(".", 1)[0] == parent and leaf in names:
                key = (x, f"{prefix}.{fused}")
                if key not in self._fused_out:
                    y = self.linear(x, f"{prefix}.{fused}")
                    outs = self.b.op("Split", [y, self.b.i64(*[int(r) for _, r in parts])], f"{prefix}.{fused}/split",
                                     n_out=len(parts), axis=-1)
                    self._fused_out[key] = dict(zip(names, outs if len(parts) > 1 else [outs]))
                return self._fused_out[key][leaf]
        raise UserError(f"master checkpoint has no linear '{prefix}.{name}'; re-run quantize")

    def norm_role(self, x: str, prefix: str, role: str) -> str:
        """x through the block's norm of `role` (BlockNorms), or x unchanged where the family has none."""
        hf = getattr(self.fam.norms, role)
        return x if hf is None else self.rms_norm(x, f"{prefix}.{hf}.weight", f"{prefix}/{hf}")

    def activation(self, gate: str, name: str) -> str:
        b = self.b
        if self.d.activation == "silu":
            return b.op("Mul", [gate, b.op("Sigmoid", [gate], f"{name}/sigmoid")], f"{name}/silu")
        # gelu, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))
        cube = b.op("Mul", [b.op("Pow", [gate, b.const(3.0, b.np)], f"{name}/cube"), b.const(0.044715, b.np)], f"{name}/c3")
        inner = b.op("Mul", [b.op("Add", [gate, cube], f"{name}/inner"), b.const(np.sqrt(2 / np.pi), b.np)], f"{name}/k")
        t = b.op("Add", [b.op("Tanh", [inner], f"{name}/tanh"), b.const(1.0, b.np)], f"{name}/one_plus")
        return b.op("Mul", [b.op("Mul", [gate, t], f"{name}/x_t"), b.const(0.5, b.np)], f"{name}/gelu")

    def scaled(self, x: str, scale: float, name: str) -> str:
        return x if scale == 1.0 else self.b.op("Mul", [x, self.b.const(scale, self.b.np)], name)

    def softcap(self, x: str, cap: float | None, name: str) -> str:
        if not cap:
            return x
        c = self.b.const(float(cap), self.b.np)
        t = self.b.op("Tanh", [self.b.op("Div", [x, c], f"{name}/div")], f"{name}/tanh")
        return self.b.op("Mul", [t, c], f"{name}/mul")

    # the model ---------------------------------------------------------------------------------------
    def block(self, x: str, i: int, masks: Masks, ropes: dict) -> str:
        """Decoder layer i: attention and MLP with the family's norms, scales and soft-cap."""
        b, d, norms = self.b, self.d, self.fam.norms
        p = f"{self.fam.blocks_path}.{i}"
        kvh, hd = d.kv[i]
        h = self.norm_role(x, p, "attn_in")
        q, k, v = (self.projection(h, p, f"self_attn.{n}_proj") for n in "qkv")
        if norms.qk_span == "full":
            q, k = self.norm_role(q, p, "q"), self.norm_role(k, p, "k")
        q = b.op("Reshape", [q, b.i64(0, 0, d.heads, hd)], f"{p}/q_r")
        k = b.op("Reshape", [k, b.i64(0, 0, kvh, hd)], f"{p}/k_r")
        if norms.qk_span == "head":
            q, k = self.norm_role(q, p, "q"), self.norm_role(k, p, "k")
        q = b.op("Transpose", [q], f"{p}/q_t", perm=[0, 2, 1, 3])
        k = b.op("Transpose", [k], f"{p}/k_t", perm=[0, 2, 1, 3])
        v = b.op("Transpose", [b.op("Reshape", [v, b.i64(0, 0, kvh, hd)], f"{p}/v_r")], f"{p}/v_t", perm=[0, 2, 1, 3])
        spec = d.rope[i]
        if spec is not None:
            if spec not in ropes:
                ropes[spec] = cos_sin(b, spec, f"rope{len(ropes)}")
            cos, sin = ropes[spec]
            q = rotate(b, q, cos, sin, hd, spec.dim, f"{p}/q")
            k = rotate(b, k, cos, sin, hd, spec.dim, f"{p}/k")
        pk = b.op_to("Concat", [f"past_key_values.{i}.key", k], f"present.{i}.key", axis=2)
        pv = b.op_to("Concat", [f"past_key_values.{i}.value", v], f"present.{i}.value", axis=2)
        o = attend(b, q, pk, pv, masks.allowed(d.attention[i].window), d.heads, kvh, hd, d.attention_scale,
                   d.attn_softcap, f"{p}/attn")
        o = self.norm_role(self.linear(o, f"{p}.self_attn.o_proj"), p, "attn_out")
        x = b.op("Add", [x, self.scaled(o, d.residual_scale, f"{p}/attn_residual_scale")], f"{p}/residual_attn")
        h = self.norm_role(x, p, "ffn_in")
        if self.fam.experts is not None:  # mixture of experts: moe.py
            m = self.norm_role(moe_mlp(self, h, p), p, "ffn_out")
        else:
            gate, up = self.projection(h, p, "mlp.gate_proj"), self.projection(h, p, "mlp.up_proj")
            act = b.op("Mul", [self.activation(gate, f"{p}/act"), up], f"{p}/glu")
            m = self.norm_role(self.linear(act, f"{p}.mlp.down_proj"), p, "ffn_out")
        return b.op("Add", [x, self.scaled(m, d.residual_scale, f"{p}/mlp_residual_scale")], f"{p}/residual_mlp")

    def io(self) -> tuple[list, list]:
        """The graph's inputs and outputs (value infos), the KV cache with each layer's own dims."""
        b, d, T = self.b, self.d, self.b.tp
        inputs = [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
            helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", T, ["batch_size", "sequence_length", d.vocab])]
        for i, (kvh, hd) in enumerate(d.kv):
            for kv in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kv}", T,
                                                            ["batch_size", kvh, "past_sequence_length", hd]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kv}", T,
                                                             ["batch_size", kvh, "total_sequence_length", hd]))
        b.reserve(*(vi.name for vi in inputs + outputs))
        return inputs, outputs

    def head(self, h: str, emb: str | None) -> str:
        """Logits (batch, seq, vocab) of the final hidden states, before the logit scale and soft-cap."""
        b, d, head = self.b, self.d, self.fam.head
        if head in self.master.linears:
            return self.linear(h, head)
        if d.tied or f"{head}.weight" not in self.master.tensors:
            if not d.tied:
                raise UserError(f"master checkpoint has no {head}.weight and the config does not tie it; re-run quantize")
            w = emb
        else:
            w = self.weight_init(f"{head}.weight", self.tensor(f"{head}.weight"))
        h2 = b.op("Reshape", [h, b.i64(-1, d.hidden)], "lm_head/flatten")
        y = b.op("Gemm", [h2, w], "lm_head/Gemm", transB=1)
        shape = b.op("Concat", [b.op("Shape", ["input_ids"], "lm_head/shape_ids"), b.i64(d.vocab)], "lm_head/shape", axis=0)
        return b.op("Reshape", [y, shape], "lm_head/logits")

    def build(self) -> onnx.ModelProto:
        b, d, fam = self.b, self.d, self.fam
        inputs, outputs = self.io()
        emb = None
        if self.master.head_shares_embedding:  # the tied head is quantized: gather from its MatMulNBits weights
            x = quantized_embedding(self, fam.head)
        else:
            emb = self.weight_init(f"{fam.embed}.weight", self.tensor(f"{fam.embed}.weight"))
            x = b.op("Gather", [emb, "input_ids"], "embed_tokens", axis=0)
        x = self.scaled(x, d.embedding_scale, "embed_tokens/scale")
        masks, ropes = Masks(b, "past_key_values.0.key"), {}
        for i in range(d.layers):
            x = self.block(x, i, masks, ropes)
        h = self.rms_norm(x, f"{fam.final_norm}.weight", "model/norm")
        y = self.softcap(self.scaled(self.head(h, emb), d.logit_scale, "logits/scale"), d.final_softcap, "logits/softcap")
        b.op_to("Identity", [y], "logits")
        graph = helper.make_graph(b.nodes, "neuqi_decoder", inputs, outputs, b.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET),
                                                        helper.make_opsetid("com.microsoft", MS_OPSET)],
                                  producer_name="neuqi-export", producer_version="0.1.0")
        model.ir_version = IR_VERSION
        return model
