"""MatMulNBits packing (per the com.microsoft op spec), block-size choice, the uint8-zero-point +
correction form, and single-node runs in onnxruntime against the master's dequantized weights."""
import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from converters.onnx.matmulnbits import (choose_block_size, group_sum_matrix, pack_codes, pack_zero_points, prepare,
                                         reference_matmul)
from converters.onnx.rope import rope_spec
from neuqi_export.errors import UserError
from neuqi_export.master import QuantizedLinear


def _lin(N, K, bits, G, seed=0, zero_lo=-0.4, zero_hi=None):
    g = torch.Generator().manual_seed(seed)
    L = 1 << bits
    ng = -(-K // (K if G == -1 else G))
    codes = torch.randint(0, L, (N, K), generator=g).to(torch.uint8)
    scale = torch.rand(N, ng, generator=g) * 0.1 + 0.01
    hi = (L - 1 + 0.4) if zero_hi is None else zero_hi
    zero = zero_lo + torch.rand(N, ng, generator=g) * (hi - zero_lo)  # float, also slightly outside [0, L-1]
    return QuantizedLinear(codes, scale, zero, bits, G)


def test_pack_layout_low_first():
    codes = np.arange(32, dtype=np.uint8).reshape(1, 32) % 16
    B = pack_codes(codes, 4, 16)
    assert B.shape == (1, 2, 8)
    assert B[0, 0, 0] == (0 | 1 << 4) and B[0, 0, 1] == (2 | 3 << 4) and B[0, 1, 7] == (14 | 15 << 4)
    c2 = np.array([[1, 2, 3, 0] * 4 + [3] * 16], dtype=np.uint8)
    B2 = pack_codes(c2, 2, 16)
    assert B2.shape == (1, 2, 4) and B2[0, 0, 0] == (1 | 2 << 2 | 3 << 4) and B2[0, 1, 0] == 0xFF
    B8 = pack_codes(np.arange(20, dtype=np.uint8).reshape(1, 20), 8, 16)  # ragged: zero codes past K
    assert B8.shape == (1, 2, 16) and list(B8[0, 1, :4]) == [16, 17, 18, 19] and not B8[0, 1, 4:].any()
    zp = pack_zero_points(np.array([[1, 2, 3]], dtype=np.uint8), 4)  # (N, ceil(3*4/8)) = (1, 2)
    assert zp.shape == (1, 2) and zp[0, 0] == (1 | 2 << 4) and zp[0, 1] == 3


def test_block_size_choice():
    assert choose_block_size(576, 128) == 128
    assert choose_block_size(576, 32) == 32
    assert choose_block_size(576, 96) == 32  # a block must stay inside one group
    assert choose_block_size(4096, 1024) == 256  # capped; params repeated over 4 blocks
    assert choose_block_size(576, -1) == 128 and choose_block_size(64, -1) == 64 and choose_block_size(10, -1) == 16
    with pytest.raises(UserError, match="group size 8"):
        choose_block_size(576, 8)


def test_group_sum_and_correction_sign():
    M = group_sum_matrix(5, 2)
    assert M.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]
    lin = _lin(3, 40, 4, 16, zero_lo=0.45, zero_hi=0.55)  # round(Z) flips between 0 and 1
    x = np.random.default_rng(0).standard_normal((2, 40)).astype(np.float32)
    ref = x.astype(np.float64) @ lin.dequantize().double().numpy().T
    fast = prepare(lin, "fast")
    assert fast.correction is not None and np.abs(fast.correction).max() > 0
    assert np.abs(reference_matmul(x, fast) - ref).max() < 1e-5 * np.abs(ref).max()
    assert np.abs(reference_matmul(x, prepare(lin, "float")) - ref).max() < 1e-5 * np.abs(ref).max()


def _session(w, acc):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(w.B, "B"), numpy_helper.from_array(w.scales, "S"), numpy_helper.from_array(w.zero_points, "Z")]
    out0 = "y0" if w.correction is not None else "y"
    nodes = [helper.make_node("MatMulNBits", ["x", "B", "S", "Z"], [out0], domain="com.microsoft",
                              K=w.K, N=w.N, bits=w.bits, block_size=w.block_size, accuracy_level=acc)]
    if w.correction is not None:
        inits += [numpy_helper.from_array(group_sum_matrix(w.K, w.group_size), "M"), numpy_helper.from_array(w.correction, "D")]
        nodes += [helper.make_node("MatMul", ["x", "M"], ["gs"]), helper.make_node("MatMul", ["gs", "D"], ["c"]),
                  helper.make_node("Add", ["y0", "c"], ["y"])]
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", w.K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", w.N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("G", [32, -1])
def test_single_node_exact_in_onnxruntime(bits, G):
    """K = 80: with G=32 a ragged last group (32+32+16); per-channel: one ragged 128-block."""
    lin = _lin(48, 80, bits, G, seed=bits)
    x = np.random.default_rng(bits).standard_normal((5, 80)).astype(np.float32)
    ref = x.astype(np.float64) @ lin.dequantize().double().numpy().T
    for form in ("fast", "float"):
        w = prepare(lin, form)
        assert w.bits == (4 if bits == 3 else bits)
        assert w.zero_point_form == ("float" if form == "float" and bits != 8 else "uint8+correction")
        y = _session(w, 1).run(None, {"x": x})[0]
        assert np.abs(y - ref).max() < 1e-5 * np.abs(ref).max(), (form, np.abs(y - ref).max())
        # the codes past K in the ragged last block are never read: fill them with the top code, same result
        if w.K % w.block_size:
            full = np.full((w.N, w.k_blocks * w.block_size), (1 << w.bits) - 1, dtype=np.uint8)
            full[:, :w.K] = lin.codes.numpy()
            w.B = pack_codes(full, w.bits, w.block_size)
            y2 = _session(w, 1).run(None, {"x": x})[0]
            assert np.abs(y2 - ref).max() < 1e-5 * np.abs(ref).max(), (form, "padding read")


ROPES = {
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    "linear": dict(factor=4.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=4096),
    "longrope": dict(short_factor=[1.0 + 0.1 * i for i in range(16)], long_factor=[2.0 + 0.3 * i for i in range(16)],
                     original_max_position_embeddings=4096),
}


@pytest.mark.parametrize("rtype", sorted(ROPES))
def test_rope_inv_freq_matches_transformers(rtype):
    """inv_freq and attention scaling of every rope type the graph writes equal transformers' own functions (a
    partial rotary width of 32 of head_dim 64; LongRoPE's short and long tables)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from neuqi_export.archs import family_for

    params = {"rope_theta": 5e5, "rope_type": rtype, "partial_rotary_factor": 0.5, **ROPES[rtype]}
    cfg = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 1,
           "max_position_embeddings": 131072, "rope_parameters": params}
    spec = rope_spec(cfg, family_for(cfg).layer_attention(cfg)[0].rope, 64)
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=dict(params),
                         max_position_embeddings=131072)
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rtype](hf_cfg, "cpu")
    assert spec.dim == 32 and np.allclose(spec.inv_freq, ref.numpy(), rtol=1e-6, atol=0), rtype
    assert spec.scaling == pytest.approx(ref_scale, rel=1e-12)
    if rtype == "longrope":
        long, _ = ROPE_INIT_FUNCTIONS[rtype](hf_cfg, "cpu", seq_len=4097)
        assert spec.switch == 4096 and np.allclose(spec.long_inv_freq, long.numpy(), rtol=1e-6, atol=0)


def test_unknown_rope_type_refused():
    with pytest.raises(UserError, match="rope_type 'dynamic' is not supported by the ONNX exporter"):
        rope_spec({}, {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 4.0}, 64)


def test_integer_zero_points_need_no_correction():
    lin = _lin(16, 64, 4, 32)
    lin.zero = torch.round(lin.zero).clamp(0, 15)
    w = prepare(lin, "fast")
    assert w.correction is None and w.zero_point_form == "uint8"
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    ref = x.astype(np.float64) @ lin.dequantize().double().numpy().T
    assert np.abs(_session(w, 1).run(None, {"x": x})[0] - ref).max() < 1e-5 * np.abs(ref).max()
