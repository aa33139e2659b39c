"""Lazy loading (neuqi_export/lazy.py): a sharded bf16 checkpoint quantized block by block from its shards gives
the same master bytes as the model loaded whole, holds one block at a time, and broken shards end in one line."""

import pytest
import torch
from model_factory import build_model

from neuqi_export import lazy
from neuqi_export.errors import UserError
from neuqi_export.master_store import tensor_digests
from neuqi_export.modeling import load_hf_model
from neuqi_export.pipeline import QuantizeOptions, quantize_model

pytestmark = pytest.mark.usefixtures("one_thread")
OPTS = dict(bits=3, group_size=32, init="neuqi", gptq=True, nsamples=2, seqlen=32)


def _sharded(tmp_path, real_tokenizer, model_type, dtype=torch.bfloat16):
    model = build_model(model_type, len(real_tokenizer), seed=3).to(dtype)
    d = tmp_path / f"{model_type}-sharded"
    model.save_pretrained(str(d), max_shard_size="100KB")
    real_tokenizer.save_pretrained(str(d))
    assert (d / lazy.INDEX).is_file() and len(list(d.glob("*.safetensors"))) > 2
    return d


def _sha(path):
    return tensor_digests(path)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_lazy_master_is_byte_identical_to_the_in_memory_one(model_type, tmp_path, real_tokenizer, real_assets,
                                                            monkeypatch):
    from neuqi_export.data import read_text

    src = _sharded(tmp_path, real_tokenizer, model_type)
    calib = read_text(real_assets.calib_text)[:200_000]
    opts = QuantizeOptions(**OPTS, lm_head_bits=4)
    live, peak = set(), [0]
    materialize, release = lazy.LazyModel.materialize, lazy.LazyModel.release

    def counting_materialize(self, prefix):
        if ".layers." in prefix:
            live.add(prefix)
            peak[0] = max(peak[0], len(live))
        return materialize(self, prefix)

    def counting_release(self, prefix):
        live.discard(prefix)
        return release(self, prefix)

    monkeypatch.setattr(lazy.LazyModel, "materialize", counting_materialize)
    monkeypatch.setattr(lazy.LazyModel, "release", counting_release)
    quantize_model(src, tmp_path / "lazy", opts, calib_text=calib, progress=False)
    assert peak[0] == 1 and not live  # one decoder block in memory at a time, none left after
    monkeypatch.setattr(lazy, "open_model", lambda d: lazy.EagerModel(load_hf_model(d)[0]))
    quantize_model(src, tmp_path / "eager", opts, calib_text=calib, progress=False)
    assert _sha(tmp_path / "lazy") == _sha(tmp_path / "eager")


def test_missing_and_truncated_shards_end_in_one_line(tmp_path, real_tokenizer):
    src = _sharded(tmp_path, real_tokenizer, "llama", torch.float32)
    shards = sorted(src.glob("*.safetensors"))
    data = shards[1].read_bytes()
    for cut in (len(data) // 2, 5):  # the tensors cut short, and the header itself
        shards[1].write_bytes(data[:cut])
        with pytest.raises(UserError, match=rf"shard '.*{shards[1].name}' is truncated or corrupt.*re-download it"):
            lazy.ShardMap.of(src)  # found when the map is built, before any work
    shards[1].unlink()
    with pytest.raises(UserError, match=rf"shard '.*{shards[1].name}' named in model.safetensors.index.json is missing"):
        lazy.ShardMap.of(src)
