"""imatrix interop: the master's h written as a llama.cpp imatrix (GGUF and legacy .dat) and read back;
names, shared q/k/v vectors, damping undone; the GGUF layout checked with gguf's own reader. (llama-quantize
accepting the file is exercised by tools/gguf_compare.py, which needs the llama.cpp binaries.)"""
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from converters.gguf.imatrix import read_imatrix, read_imatrix_file, write_imatrix
from neuqi_export.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixtures import make_tiny  # noqa: E402


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("imatrix")
    m, _ = make_tiny(tmp, "llama", bits=4, group_size=32, hidden=256, intermediate=512)
    m.config["quantization_config"].update(calibrated=True, percdamp=0.01, nsamples=8, seqlen=64)
    # q/k/v and gate/up share one input in the pipeline: give them one h, as quantize_model does
    for lname, lin in m.linears.items():
        if lname.endswith(("k_proj", "v_proj")):
            lin.hdiag = m.linears[lname.rsplit(".", 1)[0] + ".q_proj"].hdiag
        if lname.endswith("up_proj"):
            lin.hdiag = m.linears[lname.replace("up_proj", "gate_proj")].hdiag
    return tmp, m


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_round_trip(master, fmt):
    tmp, m = master
    path = write_imatrix(m, tmp / f"imat.{fmt}", fmt=fmt)
    with open(path, "rb") as f:
        assert (f.read(4) == b"GGUF") == (fmt == "gguf")
    back = read_imatrix(path, m.config)
    assert set(back) == set(m.linears)
    p = 0.01
    for name, lin in m.linears.items():
        h = lin.hdiag.double()
        raw = (h - p / (1 + p) * h.mean()).clamp_min(0)
        assert torch.allclose(back[name].double(), raw, rtol=1e-5, atol=1e-7), name
        damped = raw + p * raw.mean()  # what the pipeline does to H's diagonal
        assert torch.allclose(damped, h, rtol=1e-5)
    imp, meta = read_imatrix_file(path)
    assert "blk.0.attn_q.weight" in imp and "blk.1.ffn_down.weight" in imp
    assert np.array_equal(imp["blk.0.attn_q.weight"], imp["blk.0.attn_v.weight"])
    assert meta["chunk_count"] == 8


def test_gguf_layout(master):
    tmp, m = master
    path = write_imatrix(m, tmp / "layout.gguf")
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in r.fields
    assert r.fields["imatrix.chunk_size"].contents() == 64
    t = {x.name: x for x in r.tensors}
    s, c = t["blk.0.ffn_down.weight.in_sum2"], t["blk.0.ffn_down.weight.counts"]
    assert list(s.shape) == [512, 1] and list(c.shape) == [1, 1] and float(c.data.reshape(-1)[0]) == 8 * 64
    assert s.tensor_type == gguf.GGMLQuantizationType.F32


def test_errors(master):
    tmp, m = master
    path = write_imatrix(m, tmp / "e.gguf")
    other = dict(m.config, hidden_size=128)
    with pytest.raises(UserError, match="another model"):
        read_imatrix(path, other)
    with pytest.raises(UserError):
        read_imatrix(tmp / "missing.gguf", m.config)
    (tmp / "junk.dat").write_bytes(b"\xff\xff\xff\x7f")
    with pytest.raises(UserError):
        read_imatrix(tmp / "junk.dat", m.config)
    import copy

    m2 = copy.copy(m)
    m2.config = dict(m.config, quantization_config=dict(m.config["quantization_config"], calibrated=False))
    with pytest.raises(UserError, match="without calibration"):
        write_imatrix(m2, tmp / "u.gguf")


def test_imatrix_replaces_calibration(tiny_llama_dir, tmp_path, capsys):
    """`quantize --imatrix FILE`: the file's h (damped like H) is the NeUQI objective's diag(H) for every linear, in
    the uniform and the K-quant-aware modes; GPTQ (needs the full H) and a missing file are refused."""
    import json

    from converters.gguf.imatrix import linear_names, write_imatrix_gguf
    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.modeling import load_hf_model
    from neuqi_export.pipeline import QuantizeOptions, quantize_model
    from neuqi_export.quant.params import init_params

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    rng = np.random.default_rng(0)
    h = {g: rng.uniform(0.0, 4.0, config["intermediate_size"] if "ffn_down" in g else config["hidden_size"]) ** 3
         for g in linear_names(config).values()}
    path = tmp_path / "user.imatrix.gguf"
    write_imatrix_gguf(path, {g: (v * 100, 100.0) for g, v in h.items()}, ["user text"], 10, 10)

    opts = QuantizeOptions(bits=3, group_size=32, calibrate=False, imatrix=str(path))
    importance = read_imatrix(path, config)  # the CLI reads the file; the pipeline takes the mapping
    quantize_model(tiny_llama_dir, tmp_path / "m", opts, progress=False, importance=importance)
    m = MasterCheckpoint.load(tmp_path / "m")
    model = load_hf_model(tiny_llama_dir)[0]
    differs = 0
    for hf, g in linear_names(config).items():
        want = torch.from_numpy(h[g]).float()
        want = want + 0.01 * want.mean()
        lin = m.linears[hf]
        assert torch.allclose(lin.hdiag, want, rtol=1e-5), hf
        W = model.get_submodule(hf).weight.detach().float()
        s, z = init_params(W, 3, 32, "neuqi", hdiag=lin.hdiag)
        assert torch.equal(lin.scale, s) and torch.equal(lin.zero, z), hf
        differs += not torch.equal(s, init_params(W, 3, 32, "neuqi")[0])
    assert differs == len(m.linears)  # h = 1 would have given other parameters

    from converters.gguf.presets import linear_types

    lat = QuantizeOptions(calibrate=False, imatrix=str(path), gguf_types=linear_types(config, preset="Q4_K_M"))
    quantize_model(tiny_llama_dir, tmp_path / "lat", lat, progress=False, importance=importance)
    lm = MasterCheckpoint.load(tmp_path / "lat")
    q = "model.layers.0.self_attn.q_proj"
    assert torch.allclose(lm.linears[q].hdiag, m.linears[q].hdiag) and lm.linears[q].qtype == "Q5_0"  # Q4_K falls back on 64-wide rows

    with pytest.raises(UserError, match="--gptq needs calibration text"):
        QuantizeOptions(calibrate=False, imatrix=str(path), gptq=True).validate()
    from neuqi_export.cli import main

    assert main(["quantize", str(tiny_llama_dir), "-o", str(tmp_path / "x"), "--no-calib", "--imatrix",
                 str(tmp_path / "no"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
