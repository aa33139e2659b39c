"""compressed-tensors' ignore list comes from the module names quantize recorded in the master, not from a
transformers model built at export time (issue 18 item 3)."""
import hashlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def master_dir(tmp_path_factory):
    sys.path[:0] = [str(ROOT / "tools")]
    from family_matrix import tiny_master

    return tiny_master("phi3", 4, tmp_path_factory.mktemp("ctmod"), init="neuqi_int")  # fused qkv / gate_up


def _digests(d: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())}


def test_quantize_records_transformers_linear_names(master_dir):
    import converters.compressed_tensors as ct
    from neuqi_export.master import MasterCheckpoint

    master = MasterCheckpoint.load(master_dir)
    assert master.linear_modules == ct._linear_modules(master.config)  # the meta model's nn.Linear names, in order
    assert "model.layers.0.self_attn.qkv_proj" in master.linear_modules and "lm_head" in master.linear_modules


def test_export_builds_no_model_and_writes_what_the_model_would_give(master_dir, tmp_path, monkeypatch):
    import converters.compressed_tensors as ct
    from converters.registry import load_all
    from neuqi_export.master import MasterCheckpoint

    exporter = load_all()["compressed-tensors"]
    master = MasterCheckpoint.load(master_dir)
    master.config["quantization_config"] = {k: v for k, v in master.quantization_config.items()
                                            if k != "linear_modules"}  # a master from before: asks transformers
    exporter.export(master, tmp_path / "fallback", overwrite=True)

    def no_model(cfg):
        raise AssertionError("export built a transformers model")

    monkeypatch.setattr(ct, "_linear_modules", no_model)
    exporter.export(MasterCheckpoint.load(master_dir), tmp_path / "recorded", overwrite=True)
    assert _digests(tmp_path / "recorded") == _digests(tmp_path / "fallback")
