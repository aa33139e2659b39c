"""GGUF exporter (llama.cpp, llama-cpp-python, LM Studio, Ollama).

    neuqi-export export MASTER --to gguf --type Q4_1 -o model.gguf

Families: every registered family with a llama.cpp architecture (neuqi_export.archs; arch.py turns its entry
into GGUF names and keys: Gemma norms stored as w + 1, sliding-window patterns, soft-caps, Granite's scales, phi3's
fused attn_qkv / ffn_up); a config llama.cpp would run differently (NoPE layers off its fixed pattern, sliding
windows an architecture does not apply, ...) is refused in one line before any output.

Weight types (--type; each type's block, bits, file type, fallback, fit, pack and refit are its row in types.py):
- Q4_1 (masters of <= 4 bits), Q5_1 (<= 5 bits): EXACT. A 32-weight block holds the master's codes
  unchanged, with d = scale, m = -scale*zero stored in fp16 (m compensates d's rounding). Needs
  group size % 32 == 0 (32/64/128/..., per-channel) and in % 32 == 0; otherwise the tensor is refit
  per 32-block on the diag(H) objective (in % 32 == 0) or stored F16, and the report says so.
- Q4_K (<= 4 bits), Q3_K (<= 3), Q2_K (<= 2): size-true REFITS (kquants.py): sub-block scales/mins
  on the format's integer lattice with fp16 super-scales searched to minimise Σ h (w − ŵ)² (h =
  master hdiag), codes re-rounded; the report gives each tensor's added error. Rows whose length is
  not a multiple of 256 get Q4_1 instead (exact when the master fits it), as llama-quantize also
  falls back to a legacy type there (SmolLM2: every linear but ffn_down, since 576 % 256 != 0).
- Q8_0 (<= 8 bits: `quantize --bits 8`), Q4_0 (<= 4), Q5_0 (<= 5): symmetric blocks w = d*(q - c), EXACT when
  the master's zero-points are integers that keep its codes in range (Q4_0 from 4 bits: Z = 8, the midpoint),
  else (NeUQI's float zero-points) refit per 32-block on diag(H) (codebook.py); IQ4_NL (<= 4): always refit (its
  values are not uniform). The report says which, per tensor. As llama-quantize's ftypes of the same names, the
  output head is Q6_K (Q8_0 for --type Q8_0 or n_embd % 256 != 0) and an untied token_embd takes the type itself.
  `--preset IQ4_NL` is llama-quantize's IQ4_NL mixture (Q5_K ffn_down in the first n/8 layers, Q5_K attn_v when
  n_gqa >= 4), `--type IQ4_NL` every linear IQ4_NL (docs/GGUF_TYPES.md).

Presets (--type Q3_K_M / --preset NAME, presets.py): llama-quantize's mixtures with its per-tensor
types and its fallbacks (IQ4_NL / Q5_0 / Q5_1 / Q8_0 / F16) for rows that are not a multiple of 256;
a tensor whose master codes are wider than its type's bits is refused. F16 / F32: the master's
dequantized linears stored as floats (e.g. as llama-quantize's input).

K-quant-aware masters (`neuqi-export convert MODEL --to gguf --type TYPE --gptq`, lattice.py): every linear is
fitted for its own GGUF type (block scales/mins on the original weights with the diag(H) objective) and GPTQ'd on
that type's lattice; the master holds the blocks themselves, which this exporter writes unchanged (EXACT) when the
preset/type asks for that type (and refits them, like any master, when it asks for another). With
`--imatrix FILE` instead of calibration text the fits use a llama.cpp importance matrix as diag(H) (no GPTQ).

Embeddings / output head (--embed-type, --output-type; unquantized in the master). 'auto' follows
llama-quantize's Q4_1 preset: output.weight -> Q6_K (Q8_0 when n_embd % 256 != 0, e.g. SmolLM2's
576); a tied token_embd is quantized like the output; an untied token_embd gets the base type
(Q4_1/Q5_1, min-max round-to-nearest, as llama-quantize without imatrix; Q8_0 for K types). Choices:
F32 F16 Q8_0 Q6_K Q4_1 Q5_1 Q4_0 Q5_0 IQ4_NL. On tiny random models the untied Q5_1 embedding alone moved logits by
~11% rms, so for parity measurements pass --embed-type Q8_0 (or F16).

Python: `export_gguf(master, out, qtype="Q4_1", embed_type="auto", output_type="auto",
tokenizer_pre=None, name=None, overwrite=False, preset=None) -> ExportReport`; presets.preset_plan(name,
config) gives a preset's per-tensor (type, bits); imatrix.write_imatrix / read_imatrix convert the master's h
to and from llama.cpp imatrix files.
"""
from __future__ import annotations

import argparse

from converters.registry import Exporter, register

from . import lattice  # noqa: F401 - registers the GGUF types as quantizer grids (neuqi_export.grids)
from .presets import PRESETS
from .types import FLOAT_TYPES, SINGLE_TYPES
from .writer import export_gguf, export_original


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--type", dest="gguf_type", default="Q4_1", choices=sorted(set(SINGLE_TYPES) | set(PRESETS)),
                   help="block type of the quantized linears: Q4_1/Q5_1 are exact, Q8_0/Q4_0/Q5_0 exact when the "
                        "master's zero-points allow (else refit on diag(H)), IQ4_NL and K types are refits, F16/F32 "
                        "dequantized; a llama-quantize mixture name (Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K) gives "
                        "per-tensor types as llama-quantize chooses them (default Q4_1)")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="llama-quantize mixture (per-tensor types, incl. its fallbacks for rows not a multiple of "
                        "256); overrides --type. Note --preset Q2_K / IQ4_NL is llama-quantize's mix, --type Q2_K / IQ4_NL every linear that type")
    p.add_argument("--allow-narrower", action="store_true",
                   help="let a preset refit the master's codes into types with fewer bits (on diag(H)) instead of "
                        "refusing; with an 8-bit master this beats llama-quantize + imatrix (docs/GGUF_COMPARE.md)")
    p.add_argument("--embed-type", default="auto", choices=FLOAT_TYPES,
                   help="token_embd type (auto = llama-quantize's choice: tied -> like output, untied -> base type)")
    p.add_argument("--output-type", default="auto", choices=FLOAT_TYPES,
                   help="output.weight type (auto = Q6_K, or Q8_0 when n_embd %% 256 != 0)")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name to write instead of the detected one (e.g. smollm, qwen2, gpt-2, llama-bpe)")
    p.add_argument("--gguf-name", default=None, help="general.name written into the GGUF (default: the model's name)")


def options_from_args(args: argparse.Namespace) -> dict:
    """export_gguf()'s keyword options from the parsed `--to gguf` CLI options (add_arguments)."""
    return {"qtype": args.gguf_type, "embed_type": args.embed_type, "output_type": args.output_type,
            "tokenizer_pre": args.tokenizer_pre, "name": args.gguf_name, "preset": args.preset,
            "narrow": bool(args.allow_narrower)}


register(Exporter(
    name="gguf",
    help="GGUF for llama.cpp: Q4_1/Q5_1 exact from the master's codes (K-quants refit)",
    add_arguments=add_arguments,
    write=export_gguf,
    options_from_args=options_from_args,
    accepts=("uniform", "gguf"),  # a K-quant-aware master's blocks are written unchanged (module doc)
))

__all__ = ["export_gguf", "export_original", "options_from_args", "add_arguments"]
