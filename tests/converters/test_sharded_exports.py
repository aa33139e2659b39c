"""MLX and compressed-tensors exports as Hugging Face shards them (converters/shards.py): a small --max-shard-size
forces several `model-0000i-of-0000N.safetensors` with an index holding the same tensors, byte for byte, as the
one-file export, and mlx-lm / transformers load them to the same logits; the default size keeps one file."""
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from neuqi_export.errors import UserError
from fixture_modules import converter_fixtures

MAX = "20KB"  # the tiny model's ~0.2 MB of tensors: about ten shards


def _fixtures():
    return converter_fixtures("onnx_fixtures")


@pytest.fixture(scope="module")
def master():
    fx = _fixtures()
    return fx.build_master(fx.build_model("llama", 300, seed=5), 4, 64)


def _tensors(d: Path) -> dict:
    """name -> (dtype, shape, bytes) of every tensor in the export directory's safetensors files."""
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert k not in out
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return out


def _export(fmt: str, master, out: Path, **kw):
    if fmt == "mlx":
        from converters.mlx import export_mlx

        return export_mlx(master, out, **kw)
    from converters.compressed_tensors import export_compressed_tensors

    return export_compressed_tensors(master, out, **kw)


def _logits(fmt: str, path: Path, ids) -> np.ndarray:
    if fmt == "mlx":
        from runtimes.mlx import load

        return load(path).logits(ids)
    from runtimes.transformers import load

    return load(path, device="cpu", n_threads=1).logits(ids)


@pytest.mark.parametrize("fmt", ["mlx", "compressed-tensors"])
def test_forced_shards_load_to_the_same_logits(master, tmp_path, fmt):
    one, many = tmp_path / "one", tmp_path / "many"
    _export(fmt, master, one)
    _export(fmt, master, many, max_shard_size=MAX)
    assert sorted(p.name for p in one.glob("*.safetensors")) == ["model.safetensors"]
    assert not (one / "model.safetensors.index.json").exists()
    shards = sorted(p.name for p in many.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left
    index = json.loads((many / "model.safetensors.index.json").read_text())
    got, want = _tensors(many), _tensors(one)
    assert got == want
    assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in want.values())
    for f in shards:  # at most 20 kB of tensor bytes a shard, or one tensor larger than that on its own
        held = [len(want[k][2]) for k, v in index["weight_map"].items() if v == f]
        assert sum(held) <= 20_000 or len(held) == 1
    ids = np.random.default_rng(2).integers(0, 300, (2, 10))
    a, b = _logits(fmt, one, ids), _logits(fmt, many, ids)
    assert np.array_equal(a, b)


def test_a_bad_shard_size_is_one_line(master, tmp_path):
    for bad in ("5 parsecs", "0", "-3GB"):
        with pytest.raises(UserError, match=r"^--max-shard-size .*") as e:
            _export("mlx", master, tmp_path / "x", max_shard_size=bad)
        assert "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())


def test_shard_rule_is_huggingface_hubs():
    """The split agrees with huggingface_hub's split_torch_state_dict_into_shards on the same tensors."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards

    from converters.shards import ShardWriter

    sizes = [300, 500, 100, 2500, 50, 50, 900, 10, 1200]
    sd = {f"t{i:02d}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}
    hf = split_torch_state_dict_into_shards(sd, max_shard_size=1000)
    w = ShardWriter(Path("/nonexistent"), 1000)
    w._write = lambda tensors: w._written.append((None, list(tensors)))  # the split only, no files
    for k, v in sd.items():
        w.add(k, v)
    w._flush()
    ours = [names for _, names in w._written]
    assert ours == [hf.filename_to_tensors[f] for f in sorted(hf.filename_to_tensors)]  # same shards, same numbers
