"""Calibration hidden states spilled to disk beyond a budget (activations.py) come back bit for bit, and a run that
spills writes the same master as one that keeps everything in RAM."""
import pytest
import torch

from neuqi_export.activations import Activations
from neuqi_export.data import read_text
from neuqi_export.master_store import tensor_digests
from neuqi_export.pipeline import QuantizeOptions, quantize_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_spilled_windows_come_back_bit_for_bit(dtype, tmp_path):
    xs = [torch.randn(1, 9, 6).to(dtype) for _ in range(21)]
    store = Activations(budget=3 * 9 * 6 * xs[0].element_size(), spill_dir=tmp_path)  # 3 windows in RAM
    for x in xs:
        store.append(x)
    assert (len(store), store.spilled) == (21, 18)
    assert all(torch.equal(store[i], xs[i]) for i in range(21)) and torch.equal(store[-1], xs[-1])
    assert all(torch.equal(a, b) for a, b in zip(store, xs))
    files = list(tmp_path.glob(".activations-*.bin"))
    assert len(files) == 1
    with pytest.raises(ValueError, match="shape"):
        store.append(torch.zeros(1, 8, 6, dtype=dtype))
    store.close()
    assert not files[0].exists() and len(store) == 0


def test_a_run_that_spills_writes_the_same_master(tiny_llama_dir, real_assets, tmp_path, monkeypatch):
    """Budget 0: every window of every block's inputs and outputs on disk; same tensors as in RAM, and no spill
    file left behind."""
    spilled = []
    real_write = Activations._write

    def counting(self, x):
        spilled.append(1)
        return real_write(self, x)

    monkeypatch.setattr(Activations, "_write", counting)
    calib = read_text(real_assets.calib_text)[:40000]
    opts = QuantizeOptions(bits=3, group_size=32, init="neuqi", gptq=True, nsamples=4, seqlen=64)
    quantize_model(tiny_llama_dir, tmp_path / "ram", opts, calib_text=calib, progress=False)
    assert not spilled
    quantize_model(tiny_llama_dir, tmp_path / "disk", opts, calib_text=calib, progress=False, activation_budget=0)
    assert len(spilled) == 4 * 2  # the 4 windows entering block 0, then block 0's outputs (block 1 is the last)
    assert tensor_digests(tmp_path / "ram") == tensor_digests(tmp_path / "disk")
    assert not (tmp_path / "disk.partial").exists()


def test_cli_activation_memory(tiny_llama_dir, tmp_path, capsys):
    from neuqi_export.cli import main

    out = tmp_path / "m"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--activation-memory", "-1", "--quiet"]) == 2
    assert "--activation-memory -1 is negative" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--activation-memory", "0", "--bits", "4",
                 "--group-size", "32", "--nsamples", "2", "--seqlen", "32", "--quiet"]) == 0
    assert (out / "config.json").is_file() and not (tmp_path / "m.partial").exists()
