"""ONNX mixture-of-experts blocks (converters/onnx/moe.py) beyond the family matrix: an expert no token is routed
to (one token, 2 of 4 experts idle) runs on zero rows and the logits still match the master; qwen3_moe's
norm_topk_prob switch is followed both ways (and matters); every expert is its own three MatMulNBits nodes and the
router a float MatMul; an fp16 graph runs; a family whose routing the graph does not know is refused in one line.

Masters are data-free (NeUQI parameters, round-to-nearest codes, g32) on the factory's tiny MoE models (4 experts,
top-2); bound 1e-4 relative at accuracy level 1, as for the dense families (measured ~1e-6).
"""
import numpy as np
import pytest
from model_factory import build_model as factory_model

from converters.onnx.export import build_model
from neuqi_export.errors import UserError
from onnx_fixtures import build_master, reference_logits, rel_err  # noqa: E402

VOCAB = 200
MOE = ["qwen3_moe", "mixtral"]


def _logits(model, ids, dtype=np.float32):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    b, L = ids.shape
    feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((b, L), np.int64),
            "position_ids": np.tile(np.arange(L, dtype=np.int64), (b, 1))}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feed[inp.name] = np.zeros((b, inp.shape[1], 0, inp.shape[3]), dtype)
    return sess.run(["logits"], feed)[0]


@pytest.mark.parametrize("model_type", MOE)
def test_idle_experts_and_graph_layout(model_type, one_thread):
    master = build_master(factory_model(model_type, VOCAB, seed=5), 4, 32)
    model, g = build_model(master, accuracy_level=1, float_storage="exact")
    ops = [n.op_type for n in model.graph.node]
    layers, experts = g.d.layers, 4
    assert ops.count("MatMulNBits") == layers * (4 + 3 * experts)  # q k v o + gate/up/down of every expert
    assert ops.count("TopK") == layers and "QMoE" not in ops and "MoE" not in ops
    router = [n for n in model.graph.node if n.name.startswith("/model.layers.0.mlp.gate/MatMul")]
    assert [n.op_type for n in router] == ["MatMul"]  # the router stays float
    for t in range(3):  # one token: 2 of the 4 experts get no token in every layer
        ids = np.array([[7 + 31 * t]])
        assert rel_err(_logits(model, ids), reference_logits(master, ids)) < 1e-4


def test_qwen3_moe_norm_topk_prob_both_ways(one_thread):
    ids = np.random.default_rng(4).integers(0, VOCAB, (2, 12))
    refs = {}
    for norm in (True, False):
        master = build_master(factory_model("qwen3_moe", VOCAB, seed=6, norm_topk_prob=norm), 4, 32)
        refs[norm] = reference_logits(master, ids)
        model, _ = build_model(master, accuracy_level=1, float_storage="exact")
        assert rel_err(_logits(model, ids), refs[norm]) < 1e-4
    assert rel_err(refs[False], refs[True]) > 1e-2  # the switch matters on these weights


def test_fp16_graph_runs_close(one_thread):
    """fp16 activations (float32 routing and expert sums, as ScatterND 'add' needs on CPU): close, not exact."""
    master = build_master(factory_model("mixtral", VOCAB, seed=5), 4, 32)
    model, _ = build_model(master, dtype="fp16", accuracy_level=1)
    ids = np.random.default_rng(2).integers(0, VOCAB, (1, 10))
    assert rel_err(_logits(model, ids, np.float16), reference_logits(master, ids)) < 3e-2


def test_unknown_routing_refused_in_one_line(monkeypatch):
    import dataclasses

    from converters.onnx.graph import check_config
    from neuqi_export.archs import REGISTRY

    master = build_master(factory_model("mixtral", VOCAB, seed=5), 4, 32)
    monkeypatch.setitem(REGISTRY, "mixtral", dataclasses.replace(REGISTRY["mixtral"], router_renormalises=None))
    with pytest.raises(UserError, match="mixtral: the ONNX exporter does not know") as exc:
        check_config(master.config)
    assert "\n" not in str(exc.value) and "export" in str(exc.value)
    with pytest.raises(UserError, match="routing"):
        build_model(master)
