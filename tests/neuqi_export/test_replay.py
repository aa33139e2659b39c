"""Replaying final sub-module outputs inside a block's calibration (replay.py) changes no bit of the result."""
import json

import pytest
import torch

from neuqi_export import replay as replay_mod
from neuqi_export.data import read_text
from neuqi_export.master_store import tensor_digests
import converters.gguf  # noqa: F401 - registers the GGUF types as quantizer grids (gguf_types below)
from neuqi_export.pipeline import QuantizeOptions, quantize_model
from neuqi_export.replay import BlockReplay


@pytest.fixture(scope="module")
def calib(real_assets):
    return read_text(real_assets.calib_text)


def _sha(path):
    return tensor_digests(path)


@pytest.mark.parametrize("fixture,gguf", [("tiny_llama_dir", False), ("tiny_qwen2_dir", False),
                                          ("tiny_llama_dir", True)])
def test_replay_gives_the_same_master_bytes_as_recomputing(fixture, gguf, request, tmp_path, calib, monkeypatch):
    """Byte-identical masters with replay on, off (budget 0) and starved (a budget that holds only some units),
    while the replayed calls really happen."""
    model_dir = request.getfixturevalue(fixture)
    opts = QuantizeOptions(bits=3, group_size=32, init="neuqi", gptq=True, nsamples=4, seqlen=64)
    if gguf:  # the K-quant-aware path shares the block loop
        cfg = json.loads((model_dir / "config.json").read_text())
        opts.gguf_types = {f"model.layers.{i}.{n}": "Q4_0" for i in range(cfg["num_hidden_layers"])
                           for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    replays = []
    real_patch = BlockReplay._patch

    def counting(self, path):
        replays.append(path)
        return real_patch(self, path)

    monkeypatch.setattr(BlockReplay, "_patch", counting)
    shas = {}
    for name, budget in (("off", 0), ("on", None), ("starved", 4 * 64 * 64 * 4 * 3)):
        replays.clear()
        quantize_model(model_dir, tmp_path / name, opts, calib_text=calib, progress=False, replay_budget=budget)
        shas[name] = _sha(tmp_path / name)
        if name == "on":  # q/k/v, o, self_attn, gate/up are each replayed in every block
            assert {"self_attn", "mlp.gate_proj", "self_attn.q_proj"} <= set(replays)
        if name == "off":
            assert not replays
    assert shas["on"] == shas["off"] == shas["starved"]


def _toy_block():
    """A block with one linear per subset whose order the toy forward does NOT follow for `late`."""
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 4, bias=False)
            self.b = torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.a(self.b(x))  # b runs first although the subsets quantize a first

    torch.manual_seed(0)
    return Toy()


def test_a_unit_whose_input_still_changes_is_caught_and_recomputed():
    """Subsets not in execution order: `b` changes after `a` was recorded; the bit-for-bit check on the first
    replayed window catches it and the unit is recomputed (results equal plain recomputation)."""
    block = _toy_block()
    xs = [torch.randn(2, 4) for _ in range(3)]
    rp = BlockReplay(block, [["a"], ["b"]], len(xs), 1 << 20)
    rp.begin_pass(1)  # a "quantized": recorded in this pass
    for w, x in enumerate(xs):
        rp.window = w
        block(x)
    rp.end_pass()
    with torch.no_grad():
        block.b.weight.mul_(0.5)  # b "quantized": a's input changes
    expect = [block(x) for x in xs]
    rp.begin_pass(2, last=True)
    got = []
    for w, x in enumerate(xs):
        rp.window = w
        got.append(block(x))
    rp.close()
    assert "a" in rp.broken and all(torch.equal(e, g) for e, g in zip(expect, got))
    assert not hasattr(block.a, "__dict__") or "forward" not in block.a.__dict__  # the patch is gone


def test_replayed_outputs_are_copies():
    """An in-place op on what a replayed module returned cannot change the record."""
    block = _toy_block()
    xs = [torch.randn(2, 4)]
    rp = BlockReplay(block, [["b"], ["a"]], 1, 1 << 20)
    rp.begin_pass(1)
    rp.window = 0
    ref = block.b(xs[0]).detach().clone()
    block(xs[0])
    rp.end_pass()
    rp.begin_pass(2)
    rp.window = 0
    block.b(xs[0]).add_(1.0)  # verified replay, then mutated by the caller
    out = block.b(xs[0])
    rp.close()
    assert torch.equal(out, ref)


def test_default_budget_is_positive():
    assert replay_mod.default_budget("cpu") > 0


def test_cli_replay_memory(tiny_llama_dir, tmp_path, capsys, real_assets):
    from neuqi_export.cli import main

    base = ["quantize", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--gptq", "--calib",
            str(real_assets.calib_text), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main(base + ["-o", str(tmp_path / "bad"), "--replay-memory", "-1"]) == 2
    assert "--replay-memory" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(base + ["-o", str(tmp_path / "off"), "--replay-memory", "0"]) == 0
    assert main(base + ["-o", str(tmp_path / "on")]) == 0
    assert _sha(tmp_path / "off") == _sha(tmp_path / "on")
