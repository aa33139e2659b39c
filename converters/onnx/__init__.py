"""ONNX exporter (onnxruntime, onnxruntime-genai): a decoder graph with com.microsoft::MatMulNBits linears.

    neuqi-export export MASTER --to onnx -o DIR [--dtype fp32|fp16] [--zero-point fast|float]
                                                [--accuracy-level 0..4] [--float-storage half|exact|fp32]

Float weights (the embedding, a float head, norms, biases) of an fp32 graph are stored in half precision and
cast to fp32 in the graph (onnxruntime folds the casts at load), halving what they take in the file: bfloat16
or float16 where that represents every value exactly (a bf16 checkpoint's always do), else rounded to float16
(`half`, the default; the report marks those tensors not exact). `--float-storage exact` keeps the rounded
ones in fp32, `fp32` stores everything as it is.

Every registered model family (neuqi_export.archs): the graph reads its norms, scales, soft-caps, fused
projections and per-layer window / rotary settings from the Family entry (graph.py); a config feature it cannot
express (a rope type other than default / linear / llama3 / yarn / longrope, bidirectional attention) is refused
in one line before any output, and `convert` checks that before quantizing.

Output directory (the layout onnxruntime-genai loads): model.onnx (+ model.onnx.data when the weights
exceed ~1.8 GB, or with external_data=True), genai_config.json where onnxruntime-genai has a model type for
the family (Family.genai_type; else it is left out and the report says so in one line), the master's
tokenizer files. Written to a temp dir beside DIR, then renamed.

Every quantized linear is EXACT (dequantizes to the master's values, up to the fp16 storage of
scale/zero with --dtype fp16):
- 2/4/8-bit codes as they are, 3-bit codes in a 4-bit container; block_size = the master group size
  (per-channel: 128-wide blocks that repeat the row's parameters); a ragged last group is a ragged last
  block (codes past K are zero and never read).
- --zero-point fast (default): uint8 zero points round(Z) in MatMulNBits (onnxruntime's fast kernels)
  plus one small MatMul per linear adding groupsum(x) @ (s*(round(Z) - Z))ᵀ: exact.
- --zero-point float: float zero points in MatMulNBits (exact in one op, but onnxruntime's CPU kernel runs
  it on a slow path at 3/4 bits; it refuses float zero points at 8 bits, so 8-bit masters always use the
  fast form).
- --accuracy-level (default 4): how MatMulNBits may compute with the activations: 4 = int8 activations
  per block (fast; ~0.5-1% relative error per matmul, NOT exact), 1 = fp32 (exact), 0 = unset.

Measured (onnxruntime 1.32 CPU, 2 threads, SmolLM2-135M shape, g128, decode after a 64-token prompt):
  4-bit: fast/acc4 58 tok/s (max rel logit err 5e-2), fast/acc1 46 tok/s (3e-6), float 9.7 tok/s (2e-6)
  2-bit: fast/acc4 54 tok/s, fast/acc1 3.9 tok/s (onnxruntime's fp32 2-bit path is slow), float 37 tok/s (exact)
  8-bit: fast/acc4 46 tok/s, fast/acc1 10 tok/s (exact)
So the fastest EXACT choice is `--accuracy-level 1` at 3/4/8 bits and `--zero-point float` at 2 bits.

Opset: ai.onnx 17 + com.microsoft 1, IR version 8; needs onnxruntime >= 1.28 (tests pass on 1.28.0 and 1.32.0). Both
are written into the model's metadata.

Python: `export_onnx(master, out, dtype="fp32", zero_point="fast", accuracy_level=4, overwrite=False,
external_data=None) -> ExportReport`.
"""
from __future__ import annotations

import argparse

from converters import float_storage
from converters.registry import Exporter, register

from .export import ACCURACY_LEVEL_DEFAULT, export_onnx
from .graph import check_config


def _add(p, *flags, **kw) -> None:
    """Add an option, leaving out flags another exporter already took (all exporters share one parser)."""
    taken = getattr(p, "_option_string_actions", {})
    free = [f for f in flags if f not in taken]
    if free:
        p.add_argument(*free, **kw)


def add_arguments(p: argparse.ArgumentParser) -> None:
    _add(p, "--dtype", "--onnx-dtype", dest="onnx_dtype", default="fp32", choices=("fp32", "fp16"),
         help="onnx: activation / float weight dtype (default fp32)")
    _add(p, "--zero-point", dest="onnx_zero_point", default="fast", choices=("fast", "float"),
         help="onnx: fast = uint8 zero points + exact correction matmul (default); float = float zero points (slow on CPU)")
    _add(p, "--accuracy-level", dest="onnx_accuracy_level", type=int, default=ACCURACY_LEVEL_DEFAULT, choices=(0, 1, 2, 3, 4),
         help="onnx: MatMulNBits accuracy_level: 4 = int8 activations (fast, default), 1 = fp32 (exact), 0 = unset")
    float_storage.add_option(p)  # shared with mlx and compressed-tensors: one option, one meaning
    _add(p, "--external-data", dest="onnx_external_data", action="store_true",
         help="onnx: always write weights to model.onnx.data (default: only when > 1.8 GB)")


def options_from_args(args: argparse.Namespace) -> dict:
    """export_onnx()'s keyword options from the parsed `--to onnx` CLI options (add_arguments)."""
    return {"dtype": args.onnx_dtype, "zero_point": args.onnx_zero_point, "accuracy_level": args.onnx_accuracy_level,
            "external_data": True if args.onnx_external_data else None, "float_storage": args.float_storage}


register(Exporter(
    name="onnx",
    help="ONNX for onnxruntime / onnxruntime-genai: MatMulNBits linears, exact (uint8 zero points + correction)",
    add_arguments=add_arguments,
    write=export_onnx,
    options_from_args=options_from_args,
    check=check_config,
    # convert keeps the head float: an 8-bit head is -19% file but +0.43% perplexity in onnxruntime at the default
    # accuracy_level 4 (int8 activations into the 49152-wide head; +0.07% in the master), over the 0.1% rule
    # (docs/SIZES.md); `--lm-head-bits 8` asks for it
    head_bits=None,
))

__all__ = ["export_onnx", "options_from_args", "add_arguments"]
