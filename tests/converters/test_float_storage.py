"""converters/float_storage.py: what each --float-storage mode stores (against float64 round trips), the model's
half dtype, and that the one --float-storage option reaches every exporter that takes it."""
import pytest
import torch

from converters.float_storage import FLOAT_STORAGE, half_dtype, store


def test_store_modes():
    bf = torch.tensor([1.0, -0.5, 3.0e-3, 2.0 ** 20], dtype=torch.bfloat16).float()  # bf16 values in fp32
    odd = torch.tensor([1.0 + 2.0 ** -20, 0.1])  # in neither half precision
    big = torch.tensor([1.0e6 + 1.0])  # outside float16's range
    for half in (torch.bfloat16, torch.float16):
        t, ok = store(odd, "half", half)
        assert t.dtype == half and not ok and torch.equal(t, odd.to(half))
        t, ok = store(odd, "exact", half)
        assert t.dtype == torch.float32 and ok and torch.equal(t, odd)
        t, ok = store(odd, "fp32", half)
        assert t.dtype == torch.float32 and ok
    t, ok = store(bf, "exact", torch.bfloat16)
    assert t.dtype == torch.bfloat16 and ok and torch.equal(t.double(), bf.double())
    t, ok = store(bf, "half", torch.float16)  # 2^20 overflows float16: kept fp32 rather than inf
    assert t.dtype == torch.float32 and ok
    t, ok = store(big, "half", torch.float16)
    assert t.dtype == torch.float32 and torch.equal(t, big)
    ints = torch.arange(5)
    assert store(ints, "half", torch.float16) == (ints, True)


def test_half_dtype_is_the_model_dtype():
    assert half_dtype({"torch_dtype": "bfloat16"}) == torch.bfloat16
    assert half_dtype({"dtype": "bfloat16"}) == torch.bfloat16
    assert half_dtype({"text_config": {"dtype": "bfloat16"}}) == torch.bfloat16
    assert half_dtype({"torch_dtype": "float16"}) == half_dtype({"torch_dtype": "float32"}) == half_dtype({}) == torch.float16


def test_one_option_for_every_exporter(tmp_path):
    from neuqi_export.cli import build_parser

    for fmt in ("onnx", "mlx", "compressed-tensors"):
        for mode in FLOAT_STORAGE:
            args = build_parser().parse_args(["export", "m", "--to", fmt, "-o", "x", "--float-storage", mode])
            assert args.float_storage == mode
    assert build_parser().parse_args(["export", "m", "--to", "mlx", "-o", "x"]).float_storage == "half"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["export", "m", "--to", "mlx", "-o", "x", "--float-storage", "fp16"])


def test_half_dtype_of_a_float32_checkpoint_follows_its_values():
    bf = {"a": torch.tensor([1.0, 0.5]), "i": torch.arange(3)}
    assert half_dtype({"dtype": "float32"}, bf) == torch.bfloat16
    assert half_dtype({"dtype": "float32"}, {**bf, "b": torch.tensor([0.1])}) == torch.float16
    assert half_dtype({"dtype": "float16"}, bf) == torch.float16


def test_half_dtype_reads_a_loaded_masters_lazy_tensors(tmp_path):
    """A loaded master's tensors are a lazy mapping (master_store.LazyDict), not a dict."""
    from fixture_modules import converter_fixtures
    from neuqi_export.master import MasterCheckpoint

    fx = converter_fixtures("onnx_fixtures")
    master = fx.build_master(fx.build_model("llama", 300, seed=1), 4, 64)
    master.tensors = {k: v.to(torch.bfloat16).float() for k, v in master.tensors.items()}
    master.save(tmp_path / "m")
    loaded = MasterCheckpoint.load(tmp_path / "m")
    assert half_dtype(loaded.config, loaded.tensors) == torch.bfloat16
