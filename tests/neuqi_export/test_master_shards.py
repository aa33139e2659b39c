"""The sharded master (master_store.py): one shard per block then the rest, with an index; read back lazily; a
master of the old single-file layout still loads; a full disk while writing leaves no output and resumable blocks."""
import errno
import json

import pytest
import torch

from neuqi_export import safetensors_io
from neuqi_export.data import read_text
from neuqi_export.errors import UserError
from neuqi_export.master import MasterCheckpoint, QuantizedLinear
from neuqi_export.master_store import INDEX_NAME, LazyDict, tensor_digests, weight_files
from neuqi_export.pipeline import QuantizeOptions, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")
OPTS = dict(bits=3, group_size=32, init="minmax", gptq=True, nsamples=2, seqlen=32)


def _linear(out, inp, seed):
    g = torch.Generator().manual_seed(seed)
    return QuantizedLinear(torch.randint(0, 8, (out, inp), generator=g, dtype=torch.uint8),
                           torch.rand(out, inp // 16, generator=g) + 0.1, torch.randn(out, inp // 16, generator=g),
                           3, 16, torch.rand(inp, generator=g))


def _master():
    linears = {f"model.layers.{b}.mlp.{p}": _linear(8, 32, 10 * b + i) for b in range(3) for i, p in enumerate("ab")}
    tensors = {"model.embed_tokens.weight": torch.randn(5, 32), "model.norm.weight": torch.randn(32),
               **{f"model.layers.{b}.input_layernorm.weight": torch.randn(32) for b in range(3)}}
    return MasterCheckpoint({"model_type": "llama", "quantization_config": {"bits": 3}}, linears, tensors)


def test_sharded_round_trip_one_shard_per_block_read_lazily(tmp_path, monkeypatch):
    m = _master()
    m.save(tmp_path / "m")
    index = json.loads((tmp_path / "m" / INDEX_NAME).read_text())
    files = [f.name for f in weight_files(tmp_path / "m")]
    assert files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert index["weight_map"]["model.layers.1.mlp.a.qweight"] == files[1]
    assert index["weight_map"]["model.layers.1.input_layernorm.weight"] == files[1]
    assert index["weight_map"]["model.norm.weight"] == files[3]
    reads = []
    from neuqi_export.master_store import TensorStore

    get = TensorStore.get
    monkeypatch.setattr(TensorStore, "get", lambda self, n: reads.append(n) or get(self, n))
    back = MasterCheckpoint.load(tmp_path / "m")
    assert isinstance(back.linears, LazyDict) and reads == []  # nothing read until asked for
    lin = back.linears["model.layers.2.mlp.b"]
    assert len(reads) == 4 and all(r.startswith("model.layers.2.mlp.b.") for r in reads)
    assert torch.equal(lin.codes, m.linears["model.layers.2.mlp.b"].codes)
    for k, v in m.tensors.items():
        assert torch.equal(back.tensors[k], v)
    for k, v in m.linears.items():
        assert torch.equal(back.linears[k].dequantize(), v.dequantize())
    back.save(tmp_path / "again")  # rewritten from the lazy master, shard by shard: the same bytes
    assert tensor_digests(tmp_path / "again") == tensor_digests(tmp_path / "m")
    assert all((tmp_path / "again" / f).read_bytes() == (tmp_path / "m" / f).read_bytes() for f in files)


def test_old_single_file_master_still_loads(tmp_path):
    m = _master()
    m.save(tmp_path / "m")
    old = tmp_path / "old"
    old.mkdir()
    raw = {}
    for f in weight_files(tmp_path / "m"):
        from safetensors.torch import load_file

        raw.update(load_file(str(f)))
    safetensors_io.save_file(raw, str(old / "model.safetensors"), metadata={"format": "pt", "neuqi_export": "master-1"})
    (old / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    back = MasterCheckpoint.load(old)
    assert set(back.linears) == set(m.linears) and set(back.tensors) == set(m.tensors)
    back.save(tmp_path / "new")
    assert tensor_digests(tmp_path / "new") == tensor_digests(old)


def test_full_disk_while_writing_leaves_no_output_and_resumes(tmp_path, tiny_llama_dir, real_assets, monkeypatch):
    text = read_text(real_assets.calib_text)[:100_000]
    ref = tmp_path / "ref"
    quantize_model(tiny_llama_dir, ref, QuantizeOptions(**OPTS), calib_text=text, progress=False)
    calls, write = [0], safetensors_io._write_bytes

    def full(f, buf):  # the disk fills up in the middle of the second block's shard (after its header and a tensor)
        if "model-00002-of-00003" in f.name:
            calls[0] += 1
            if calls[0] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        write(f, buf)

    monkeypatch.setattr(safetensors_io, "_write_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"^no space left on the device holding .*re-run the same command$") as e:
        quantize_model(tiny_llama_dir, out, QuantizeOptions(**OPTS), calib_text=text, progress=False)
    assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    partial = tmp_path / "out.partial"
    done = sorted(p.name for p in partial.glob("model-*.safetensors"))
    assert done == ["model-00001-of-00003.safetensors"] and not list(partial.glob(".*tmp"))
    monkeypatch.setattr(safetensors_io, "_write_bytes", write)
    s = quantize_model(tiny_llama_dir, out, QuantizeOptions(**OPTS), calib_text=text, progress=False)
    assert s.resumed_blocks == 1 and not partial.exists()
    assert tensor_digests(out) == tensor_digests(ref)
    assert (out / "config.json").read_text() == (ref / "config.json").read_text()
