"""`--float-storage half|exact|fp32`: how an exporter stores the master's float weights (the embedding, a float
head, norms, biases, linears written dense), one option meaning one thing in every format that takes it:

- half (default): in the format's half precision (ONNX: bf16/fp16 per tensor; MLX and compressed-tensors: one
  dtype, the model's, `half_dtype`), exact where that represents every value (a bf16 checkpoint's weights always
  are in bf16), else rounded -- the report marks the rounded tensors not exact. A tensor outside fp16's range stays fp32.
- exact: the half precision only where it is lossless, else fp32 (the file is exact).
- fp32: everything fp32.

Each exporter states which other tensors (MLX scales/biases) follow it.
"""
from __future__ import annotations

import torch

FLOAT_STORAGE = ("half", "exact", "fp32")
OPTION = "--float-storage"
HELP = ("float weights (embedding, float head, norms, biases): half = the format's half precision, rounded where "
        "not lossless (default; the report names the rounded tensors); exact = half only where lossless, else fp32; "
        "fp32 = all fp32 (each format's doc says which of its other tensors follow)")


def add_option(p) -> None:
    """Add --float-storage (dest `float_storage`) unless another exporter already did (one shared parser)."""
    if OPTION not in getattr(p, "_option_string_actions", {}):
        p.add_argument(OPTION, dest="float_storage", default="half", choices=FLOAT_STORAGE, help=HELP)


def half_dtype(config: dict, tensors=None) -> torch.dtype:
    """The model's half dtype, as mlx-lm's convert and llm-compressor take it from the checkpoint: bfloat16 or
    float16 when the config's dtype (`torch_dtype` / `dtype`) says so; for a float32 config, bfloat16 when every
    float tensor in `tensors` (a mapping or iterable) is a bfloat16 value (a bf16 checkpoint saved as float32, e.g.
    a downloaded fp32 copy of a bf16 model), else float16 (the fetched SmolLM2-135M, whose embedding is not, and
    Gemma-3-270M, dequantized from Q4_K_M)."""
    d = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype")
    d = str(d).replace("torch.", "")
    if d in ("bfloat16", "float16"):
        return getattr(torch, d)
    values = tensors.values() if hasattr(tensors, "values") else (tensors or ())
    floats = [t for t in values if t.is_floating_point()]
    if floats and all(_is_bf16(t) for t in floats):
        return torch.bfloat16
    return torch.float16


def _is_bf16(t: torch.Tensor) -> bool:
    """Every value of `t` is a bfloat16 number (its float32 bits have a zero low half)."""
    if t.dtype == torch.bfloat16:
        return True
    bits = t.detach().float().cpu().contiguous().view(torch.int32)
    return not bool((bits & 0xFFFF).any())


def store(t: torch.Tensor, mode: str, half: torch.dtype) -> tuple[torch.Tensor, bool]:
    """(tensor as stored, whether it holds `t`'s values exactly) under --float-storage `mode`. Integer tensors
    are returned as they are; float ones as fp32 or `half` per the module doc (half only when it is finite)."""
    if not t.is_floating_point():
        return t, True
    t32 = t.detach().float().cpu().contiguous()
    if mode == "fp32":
        return t32, True
    h = t32.to(half)
    lossless = bool(torch.equal(h.float(), t32))
    if lossless or (mode == "half" and bool(torch.isfinite(h).all())):
        return h.contiguous(), lossless
    return t32, True
