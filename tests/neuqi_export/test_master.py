import json

import pytest
import torch

from neuqi_export.errors import UserError
from neuqi_export.master import MasterCheckpoint, QuantizedLinear
from neuqi_export.master_store import weight_files
from neuqi_export.quant.grid import dequantize, n_groups


def _linear(out, inp, bits, gs, seed=0):
    g = torch.Generator().manual_seed(seed)
    eff = inp if gs == -1 else gs
    ng = n_groups(inp, eff)
    return QuantizedLinear(
        codes=torch.randint(0, 2**bits, (out, inp), generator=g, dtype=torch.uint8),
        scale=torch.rand(out, ng, generator=g) + 0.01,
        zero=torch.randn(out, ng, generator=g) * 3,  # float, may be negative or beyond the code range
        bits=bits, group_size=gs, hdiag=torch.rand(inp, generator=g),
    )


def test_save_load_is_exact(tmp_path):
    linears = {f"m.{b}.{gs}": _linear(7, 200, b, gs, seed=b) for b in (2, 3, 4, 8) for gs in (32, 128, -1)}
    tensors = {"norm.weight": torch.randn(200), "embed.weight": torch.randn(11, 200)}
    cfg = {"model_type": "llama", "quantization_config": {"bits": 4, "group_size": 128}}
    MasterCheckpoint(cfg, linears, tensors).save(tmp_path / "m")
    back = MasterCheckpoint.load(tmp_path / "m")
    assert back.quantization_config["quant_method"] == "neuqi"
    assert set(back.linears) == set(linears)
    for name, lin in linears.items():
        b = back.linears[name]
        assert torch.equal(b.codes, lin.codes) and torch.equal(b.scale, lin.scale) and torch.equal(b.zero, lin.zero)
        assert torch.equal(b.hdiag, lin.hdiag) and (b.bits, b.group_size) == (lin.bits, lin.group_size)
        assert torch.equal(b.dequantize(), lin.dequantize())
    for k, v in tensors.items():
        assert torch.equal(back.tensors[k], v)
    # the record's stated layout: qweight is the little-endian stream of ceil(in*bits/8) bytes per row
    from safetensors.torch import load_file

    raw = {k: v for f in weight_files(tmp_path / "m") for k, v in load_file(str(f)).items()}
    assert raw["m.3.32.qweight"].shape == (7, (200 * 3 + 7) // 8)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["modules"]["m.3.32"]
    assert meta == {"bits": 3, "group_size": 32, "shape": [7, 200]}


def test_ragged_last_group_dequantizes_with_its_own_params():
    lin = _linear(3, 200, 4, 128)  # groups of 128 and 72
    deq = lin.dequantize()
    ref = torch.empty(3, 200)
    ref[:, :128] = lin.scale[:, :1] * (lin.codes[:, :128].float() - lin.zero[:, :1])
    ref[:, 128:] = lin.scale[:, 1:] * (lin.codes[:, 128:].float() - lin.zero[:, 1:])
    assert torch.allclose(deq, ref)
    assert torch.equal(deq, dequantize(lin.codes, lin.scale, lin.zero, 128))


def test_save_refuses_existing_output_and_leaves_no_temp(tmp_path):
    m = MasterCheckpoint({"model_type": "llama", "quantization_config": {}}, {"a": _linear(2, 32, 2, 32)}, {})
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match="already exists"):
        m.save(tmp_path / "out")
    m.save(tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_load_rejects_non_master(tmp_path):
    with pytest.raises(UserError, match="not a neuqi-export master"):
        MasterCheckpoint.load(tmp_path)


def test_float_master_is_the_original_model(tiny_llama_dir):
    """float_master: no quantized linear, every tensor the HF model's own; rebuilt as a model it gives its logits."""
    from neuqi_export.modeling import float_master, load_hf_model, master_to_hf

    model = load_hf_model(tiny_llama_dir)[0]
    m = float_master(tiny_llama_dir)
    assert m.linears == {} and m.quantization_config == {"quant_method": "neuqi", "calibrated": False}
    sd = model.state_dict()
    assert set(m.tensors) == set(sd) and all(torch.equal(m.tensors[k], sd[k].float()) for k in sd)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(master_to_hf(m)(ids).logits, model(ids).logits)
