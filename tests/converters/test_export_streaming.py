"""Exports in bounded memory (issue 21, items 3 and 6): the GGUF writer holds one packed tensor at a time (the rest
parked in a spill file beside the output), so its Python-heap peak does not grow with the depth of the model; the ONNX
graph keeps no large initializer in memory (each is appended to the external data file as it is made); MLX and
compressed-tensors make a block's tensors only when the previous shard is written (their peak, with shards smaller
than a block, does not grow with depth either); a damaged
master or a full disk ends in one line with nothing under the final name and no temporaries left.

The peaks are tracemalloc's (numpy registers its buffers with it; the spill's memory maps and torch's storages are
not counted, and the lazy master's tensors are read from its shards one at a time).
"""
import errno
import sys
import tracemalloc
from pathlib import Path

import pytest

from converters.gguf import export_gguf
from neuqi_export.cli.main import main
from neuqi_export.errors import UserError
from neuqi_export.master import MasterCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_fixtures import make_tiny  # noqa: E402

WIDE = dict(hidden=512, intermediate=1024)  # every linear's packed bytes above the spill's in-RAM threshold


@pytest.fixture(scope="module")
def masters(tmp_path_factory):
    """{layers: saved master dir} for wide tiny llamas of 2 and 8 blocks."""
    tmp = tmp_path_factory.mktemp("stream")
    out = {}
    for n in (2, 8):
        m, _ = make_tiny(tmp / f"src{n}", "llama", bits=4, group_size=32, num_hidden_layers=n, **WIDE)
        out[n] = m.save(tmp / f"m{n}")
    return out


def _layer_packed_bytes(master: MasterCheckpoint, qtype: str) -> int:
    """The bytes of one block's linears stored as `qtype`."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return sum(lin.shape[0] * lin.shape[1] for n, lin in master.linears.items() if ".layers.0." in n) * size // block


def _export_peak(master_dir: Path, out: Path, qtype: str) -> int:
    master = MasterCheckpoint.load(master_dir)
    tracemalloc.start()
    try:
        export_gguf(master, out, qtype=qtype, overwrite=True)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K"])
def test_gguf_export_peak_does_not_grow_with_depth(masters, tmp_path, qtype):
    layer = _layer_packed_bytes(MasterCheckpoint.load(masters[2]), qtype)
    _export_peak(masters[2], tmp_path / "warm.gguf", qtype)  # the first export's imports and caches are not the export's
    peaks = {n: _export_peak(d, tmp_path / f"{n}.gguf", qtype) for n, d in masters.items()}
    grown = peaks[8] - peaks[2]
    # 6 more blocks: holding every packed tensor (the writer before the spill) grows the peak by ~6 blocks' bytes
    assert grown < 2 * layer, f"peak {peaks} grew by {grown} bytes for 6 blocks of {layer} packed bytes"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # spill and temp file gone


def test_full_disk_while_spilling_leaves_nothing(masters, tmp_path, monkeypatch, capsys):
    from converters.gguf import spill

    calls, hold = [0], spill.TensorSpill.hold

    def full(self, data):
        calls[0] += 1
        if calls[0] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return hold(self, data)

    monkeypatch.setattr(spill.TensorSpill, "hold", full)
    out = tmp_path / "m.gguf"
    assert main(["export", str(masters[2]), "--to", "gguf", "--type", "Q4_1", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no space left" in err and "\n" not in err
    assert calls[0] == 5 and list(tmp_path.iterdir()) == []


def test_full_disk_while_writing_the_file_leaves_nothing(masters, tmp_path, monkeypatch, capsys):
    import gguf

    write = gguf.GGUFWriter.write_tensors_to_file

    def full(self, **kw):  # the header is on disk, then the disk fills up
        self.fout[0].write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    out = tmp_path / "m.gguf"
    assert main(["export", str(masters[2]), "--to", "gguf", "--type", "Q4_1", "-o", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", write)
    assert main(["export", str(masters[2]), "--to", "gguf", "--type", "Q4_1", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_killed_exports_spill_is_swept(masters, tmp_path):
    """A spill a SIGKILLed export left (its pid gone) is removed by the next run on that output."""
    out = tmp_path / "m.gguf"
    stale = tmp_path / f".m.gguf.{2**22 + 7}.spilling"  # a pid above the kernel's pid_max default: not alive
    stale.write_bytes(b"x" * 100)
    assert main(["export", str(masters[2]), "--to", "gguf", "--type", "Q4_1", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_damaged_master_shard_is_one_line_naming_it(masters, tmp_path, damage):
    m = _copy(masters[2], tmp_path / "m")
    shard = m / "model-00002-of-00003.safetensors"
    if damage == "missing":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError) as e:
        export_gguf(MasterCheckpoint.load(m), tmp_path / "x.gguf")
    msg = str(e.value)
    assert str(shard) in msg and "\n" not in msg and damage in msg
    assert not (tmp_path / "x.gguf").exists()


def test_onnx_export_holds_no_large_initializer_in_the_graph(masters, tmp_path):
    """Every large initializer's bytes go to the external data file as the graph is built (builder.ExternalData), so
    the in-memory graph keeps only the small ones, whatever the depth; the file equals the parked bytes."""
    from converters.onnx.builder import SIZE_THRESHOLD, ExternalData
    from converters.onnx.export import build_model

    held = {}
    for n, d in masters.items():
        sink = ExternalData(tmp_path / f"{n}.data", f"{n}.data")
        try:
            model, _ = build_model(MasterCheckpoint.load(d), sink=sink)
        finally:
            sink.close()
        inits = list(model.graph.initializer)
        held[n] = sum(len(t.raw_data) for t in inits)
        assert sink.count > 6 * n and all(len(t.raw_data) < SIZE_THRESHOLD for t in inits)
        assert (tmp_path / f"{n}.data").stat().st_size > 50 * held[n]  # the weights are in the file, not the graph


def test_onnx_large_initializers_never_enter_a_tensorproto(masters, tmp_path, monkeypatch):
    """A large initializer's bytes go from its array to the file: none is made as a TensorProto with raw data (upb's
    arena keeps a message's bytes to the end even after ClearField; parking them that way grew the export's RSS by
    every tensor's bytes: 1.14 vs 0.82 GiB on a 6-block 1024-wide master, +0.42 GiB a block at 7B's shape)."""
    from onnx import helper, numpy_helper

    from converters.onnx.builder import SIZE_THRESHOLD, ExternalData
    from converters.onnx.export import build_model

    made = []
    from_array, make_tensor = numpy_helper.from_array, helper.make_tensor

    def record(fn):
        def wrapped(*a, **kw):
            t = fn(*a, **kw)
            made.append(len(t.raw_data))
            return t
        return wrapped

    monkeypatch.setattr(numpy_helper, "from_array", record(from_array))
    monkeypatch.setattr(helper, "make_tensor", record(make_tensor))
    sink = ExternalData(tmp_path / "m.data", "m.data")
    try:
        build_model(MasterCheckpoint.load(masters[2]), sink=sink)
    finally:
        sink.close()
    assert made and sink.count > 12
    assert max(made) < SIZE_THRESHOLD, f"a TensorProto held {max(made)} bytes of raw data"


def test_onnx_full_disk_leaves_nothing(masters, tmp_path, monkeypatch, capsys):
    from converters.onnx.builder import ExternalData

    write = ExternalData.write
    calls = {"n": 0}

    def full(self, *a):  # some initializers written, then the disk fills up
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, *a)

    monkeypatch.setattr(ExternalData, "write", full)
    out = tmp_path / "m.onnx"
    assert main(["export", str(masters[2]), "--to", "onnx", "-o", str(out)]) == 2
    assert "no space left" in capsys.readouterr().err.lower()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(ExternalData, "write", write)
    assert main(["export", str(masters[2]), "--to", "onnx", "-o", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.mark.parametrize("fmt", ["mlx", "compressed-tensors"])
def test_safetensors_exports_peak_does_not_grow_with_depth(masters, tmp_path, fmt):
    """With shards of ~half a block, 6 more blocks leave the peak within 2 blocks' packed bytes (an exporter that
    assembles every tensor before writing grows it by ~6 blocks'), and the shards hold every block."""
    import json

    from converters.registry import load_all

    layer = _layer_packed_bytes(MasterCheckpoint.load(masters[2]), "Q4_1")
    exporter = load_all()[fmt]

    def peak(n: int) -> int:
        master = MasterCheckpoint.load(masters[n])
        tracemalloc.start()
        try:
            exporter.export(master, tmp_path / f"{n}.{fmt}", overwrite=True, max_shard_size=layer // 2)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(2)  # imports and caches
    peaks = {n: peak(n) for n in masters}
    grown = peaks[8] - peaks[2]
    assert grown < 2 * layer, f"peak {peaks} grew by {grown} bytes for 6 blocks of {layer} packed bytes"
    index = json.loads((tmp_path / f"8.{fmt}" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 8 and all((tmp_path / f"8.{fmt}" / s).is_file() for s in shards)
    assert {k.split(".")[2] for k in index["weight_map"] if k.startswith("model.layers.")} == {str(i) for i in range(8)}


@pytest.mark.parametrize("fmt", ["gguf", "onnx", "mlx", "compressed-tensors"])
def test_each_export_reads_each_linear_of_a_loaded_master_once(masters, tmp_path, monkeypatch, fmt):
    """The bits, groups and shapes an exporter plans with come from the master's config (MasterCheckpoint.layout), so
    a linear's codes are read from the shards once, when it is written (compressed-tensors read every one three
    times, GGUF twice)."""
    import collections

    from converters.registry import load_all
    from neuqi_export import master as master_mod

    reads = collections.Counter()
    real = master_mod._read_linear

    def counted(store, name, meta):
        reads[name] += 1
        return real(store, name, meta)

    monkeypatch.setattr(master_mod, "_read_linear", counted)
    m = MasterCheckpoint.load(masters[2])
    load_all()[fmt].export(m, tmp_path / f"out.{fmt}", overwrite=True)
    assert set(reads) == set(m.linears) and set(reads.values()) == {1}, reads
