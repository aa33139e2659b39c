"""convert's per-format defaults (Exporter.init, Exporter.head_bits: one declaration per exporter, docs/SIZES.md):
used when --init / --lm-head-bits are not given, never over what the user passed."""
import pytest

from converters.registry import load_all
from neuqi_export.cli import build_parser
from neuqi_export.cli.commands import _format_defaults, _options
from neuqi_export.cli.parser import FLOAT_HEAD


def _args(*argv):
    return build_parser().parse_args(["convert", "m", "-o", "x", *argv])


@pytest.mark.parametrize("fmt", sorted(load_all()))
def test_defaults_come_from_the_exporter(fmt):
    exp = load_all()[fmt]
    args = _args("--to", fmt, "--bits", "4")
    _format_defaults(args, None)
    assert args.init == exp.init and args.lm_head_bits == exp.head_bits
    assert _options(args).lm_head_bits == exp.head_bits


def test_declared_preferences():
    exps = load_all()
    assert exps["compressed-tensors"].init == "neuqi_int" and exps["compressed-tensors"].head_bits is None
    assert exps["onnx"].init == exps["mlx"].init == exps["gguf"].init == "neuqi"


def test_explicit_values_win():
    args = _args("--to", "compressed-tensors", "--init", "neuqi", "--bits", "4")
    _format_defaults(args, None)
    assert args.init == "neuqi"
    for fmt in ("onnx", "mlx"):
        args = _args("--to", fmt, "--lm-head-bits", "float", "--bits", "4")
        _format_defaults(args, None)
        assert args.lm_head_bits == FLOAT_HEAD and _options(args).lm_head_bits is None
        args = _args("--to", fmt, "--lm-head-bits", "4", "--bits", "4")
        _format_defaults(args, None)
        assert _options(args).lm_head_bits == 4
    args = _args("--to", "onnx", "--no-calib", "--bits", "4")  # the head default was measured with calibration
    _format_defaults(args, None)
    assert args.lm_head_bits is None


def test_quantize_keeps_its_defaults():
    args = build_parser().parse_args(["quantize", "m", "-o", "x"])
    opts = _options(args)
    assert opts.init == "neuqi" and opts.lm_head_bits is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "-o", "x", "--lm-head-bits", "eight"])


def test_measured_head_choices():
    """docs/SIZES.md: mlx takes an 8-bit head (smaller at <= +0.1% perplexity); onnx (+0.43% in onnxruntime at
    accuracy_level 4), gguf (no smaller: token_embd is Q8_0 either way) and compressed-tensors (keeps the head float)
    do not."""
    exps = load_all()
    assert exps["mlx"].head_bits == 8
    assert exps["onnx"].head_bits is None and exps["gguf"].head_bits is None and exps["compressed-tensors"].head_bits is None
