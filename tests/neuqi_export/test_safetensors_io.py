"""neuqi_export/safetensors_io.py: the same tensors and metadata give the same bytes on every save."""
import hashlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from neuqi_export.master import MasterCheckpoint
from neuqi_export.master_store import weight_files
from neuqi_export.safetensors_io import save_file, sort_metadata

from test_master import _linear

TENSORS = {"b.weight": torch.arange(6.0).reshape(2, 3), "a": torch.zeros(3, dtype=torch.float16), "é": torch.ones(1)}
# 16 keys: the library's own order of them is a random one on (almost) every save (safetensors#584)
META = {**{f"k{i}": str(i) for i in range(13)}, "format": "pt", "z": 'ü"\\', "neuqi_export": "master-1"}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_repeated_saves_are_byte_identical_and_round_trip(tmp_path):
    hashes = set()
    for i in range(20):
        save_file(TENSORS, tmp_path / f"{i}.safetensors", metadata=META)
        hashes.add(_sha(tmp_path / f"{i}.safetensors"))
    assert len(hashes) == 1
    path = tmp_path / "0.safetensors"
    back = load_file(str(path))
    assert set(back) == set(TENSORS) and all(torch.equal(back[k], v) for k, v in TENSORS.items())
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == META
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + n])
    assert list(header["__metadata__"]) == sorted(META)


def test_sort_metadata_leaves_other_files_alone(tmp_path):
    save_file(TENSORS, tmp_path / "plain.safetensors")  # no metadata
    save_file(TENSORS, tmp_path / "one.safetensors", metadata={"format": "pt"})
    for name in ("plain", "one"):
        before = (tmp_path / f"{name}.safetensors").read_bytes()
        assert not sort_metadata(tmp_path / f"{name}.safetensors")
        assert (tmp_path / f"{name}.safetensors").read_bytes() == before
    # a header in another JSON encoding (spaces after the separators) than the library's: untouched
    body = json.dumps({"__metadata__": {"b": "1", "a": "2"}, "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    body = body.encode() + b" " * (-len(body) % 8)
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(body).to_bytes(8, "little") + body + torch.ones(1).numpy().tobytes())
    assert not sort_metadata(odd)
    assert odd.read_bytes()[8:8 + len(body)] == body
    assert torch.equal(load_file(str(odd))["t"], torch.ones(1))


def test_master_checkpoint_saves_are_byte_identical(tmp_path):
    linears = {f"m.{b}": _linear(5, 64, b, 32, seed=b) for b in (2, 4)}
    tensors = {"norm.weight": torch.randn(64)}
    cfg = {"model_type": "llama", "quantization_config": {"bits": 4, "group_size": 32}}
    for i in range(12):  # two metadata keys: the library alone gives one of two orders per save
        MasterCheckpoint(cfg, linears, tensors).save(tmp_path / f"m{i}")
    files = [f.name for f in weight_files(tmp_path / "m0")]
    assert len({tuple(_sha(tmp_path / f"m{i}" / f) for f in files) for i in range(12)}) == 1
