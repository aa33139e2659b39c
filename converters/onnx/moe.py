"""A mixture-of-experts block (qwen3_moe, mixtral) in the ONNX graph, from standard operators and MatMulNBits.

Why not com.microsoft QMoE (onnxruntime 1.32 has a CPU kernel): its integer dequantization takes only uint8 zero
points, inside the op, with the SwiGLU between fc1 and fc2 also inside; a NeUQI master's zero points are float,
and MatMulNBits' exact correction (groupsum(x) @ s(R - Z), matmulnbits.py) has to be added to each expert's gate
and up outputs before the activation, which the fused op gives no place for. So the block is built from parts,
computing what transformers 5's eager code computes (Qwen3MoeSparseMoeBlock / MixtralSparseMoeBlock):

    logits  = x @ routerᵀ                        (router float, MatMul; x flattened to (tokens, hidden))
    probs   = softmax(float32(logits))
    w, idx  = top-k(probs)                       (TopK; k = num_experts_per_tok)
    w      /= sum(w)  where the family renormalises (Family.router_renormalises)
    route   = (tokens, experts) matrix, w at idx, 0 elsewhere (ScatterElements)
    for each expert e:  tok = NonZero(route[:, e] > 0);  y_e = down(act(gate x[tok]) * up x[tok]) * route[tok, e]
    out     = Σ_e y_e scattered back to its tokens (ScatterND, reduction add; in float32, which onnxruntime's CPU
              ScatterND needs for 'add', then cast to the graph's dtype)

Each expert runs on its own routed tokens only (Gather / ScatterND), so the work is that of the active experts; an
expert no token is routed to runs on zero rows. (Mixtral's top-k of the softmax then renormalised is the softmax
of its top-k logits, as in its paper; a routed expert whose weight underflows to 0 adds 0 either way.)
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from neuqi_export.errors import UserError
from neuqi_export.experts import num_experts

def routing(cfg: dict, fam) -> tuple[int, int, bool]:
    """(experts, top-k, renormalise) of an MoE config; UserError for a family whose routing the registry does not give."""
    if fam.router_renormalises is None:
        raise UserError(f"{fam.model_type}: the ONNX exporter does not know this family's expert routing; "
                        "export mlx or compressed-tensors instead")
    return num_experts(cfg), int(cfg["num_experts_per_tok"]), fam.router_renormalises(cfg)


def route_matrix(g, x2: str, prefix: str) -> str:
    """The float32 (tokens, experts) routing weights of x2 (tokens, hidden): the top-k weights, 0 elsewhere."""
    b, fam = g.b, g.fam
    n_exp, k, renorm = routing(g.cfg, fam)
    name = f"{prefix}.{fam.router}"
    logits = b.to_float(g.linear(x2, name), name)
    probs = b.op("Softmax", [logits], f"{name}/softmax", axis=-1)
    top, idx = b.op("TopK", [probs, b.i64(k)], f"{name}/topk", n_out=2, axis=-1, largest=1, sorted=1)
    if renorm:
        total = b.op("ReduceSum", [top, b.i64(-1)], f"{name}/topk_sum", keepdims=1)
        top = b.op("Div", [top, total], f"{name}/renormalise")
    zeros = b.op("ConstantOfShape", [b.op("Shape", [probs], f"{name}/shape")], f"{name}/zeros",
                 value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    if n_exp != int(g.tensor(f"{name}.weight").shape[0]):
        raise UserError(f"{name}: the router has {g.tensor(f'{name}.weight').shape[0]} rows but the config names "
                        f"{n_exp} experts; the master is broken, re-run quantize")
    return b.op("ScatterElements", [zeros, idx, top], f"{name}/route", axis=1)


def moe_mlp(g, h: str, prefix: str) -> str:
    """The MoE block's output for h (batch, seq, hidden) of block `prefix` (e.g. 'model.layers.3')."""
    b, fam = g.b, g.fam
    n_exp = routing(g.cfg, fam)[0]
    base = f"{prefix}.{fam.experts}"
    x2 = b.op("Reshape", [h, b.i64(-1, g.d.hidden)], f"{base}/flatten")
    route = route_matrix(g, x2, prefix)
    acc = b.op("ConstantOfShape", [b.op("Shape", [x2], f"{base}/shape")], f"{base}/zeros",
               value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    for e in range(n_exp):
        ex = f"{base}.{e}"
        col = b.op("Reshape", [b.op("Gather", [route, b.i64(e)], f"{ex}/weight_col", axis=1), b.i64(-1)],
                   f"{ex}/weight_flat")  # (tokens,)
        tok = b.op("NonZero", [b.op("Greater", [col, b.const(0.0, np.float32)], f"{ex}/routed")], f"{ex}/nonzero")
        tok = b.op("Reshape", [tok, b.i64(-1)], f"{ex}/tokens")  # (n,)
        xe = b.op("Gather", [x2, tok], f"{ex}/gather", axis=0)
        gate, up = g.linear(xe, f"{ex}.gate_proj"), g.linear(xe, f"{ex}.up_proj")
        y = g.linear(b.op("Mul", [g.activation(gate, f"{ex}/act"), up], f"{ex}/glu"), f"{ex}.down_proj")
        w = b.op("Unsqueeze", [b.op("Gather", [col, tok], f"{ex}/weights", axis=0), b.i64(-1)], f"{ex}/weights_col")
        y = b.op("Mul", [b.to_float(y, f"{ex}/out"), w], f"{ex}/weighted")
        where = b.op("Unsqueeze", [tok, b.i64(-1)], f"{ex}/where")
        acc = b.op("ScatterND", [acc, where, y], f"{ex}/add", reduction="add")
    return b.to_model(b.op("Reshape", [acc, b.op("Shape", [h], f"{base}/shape_in")], f"{base}/out"), base)
