"""MLX exporter (mlx-lm on Apple silicon, and mlx[cpu] on Linux): MLX "affine" quantized safetensors.

    neuqi-export export MASTER --to mlx -o DIR [--mlx-scale-dtype fp32|fp16|bf16]

Output directory (what `mlx_lm.load(DIR)` reads unchanged): model.safetensors, config.json, the master's
tokenizer files. Written to a temp dir beside DIR, then renamed.

Per quantized linear `<m>`: `<m>.weight` uint32 (out, in*bits/32) -- the codes as a little-endian bit stream
along the input dimension (code j at stream bits [j*bits, (j+1)*bits), 32-bit words little-endian; the same
for every MLX width 2/3/4/5/6/8) --, `<m>.scales` and `<m>.biases` (out, in/group) with MLX's dequant
`w = scales * q + biases`. The master's float zero-point is kept exactly: biases = -scale * zero.

Group sizes: MLX takes 32, 64 or 128 and needs in % group == 0. The master's parameters are re-expressed
on the largest MLX group g' that divides both the master group size G and in_features (each g'-wide piece
of a master group repeats that group's (scale, bias)), which is EXACT. This covers a ragged last group
(SmolLM2: in=576 with G=128 -> g'=64, the 64-wide last group is one MLX group) and per-channel (G=in).
Bit widths MLX lacks (1, 7) go in the next wider container (2, 8): exact as well. A linear with no such g'
(in % 32 != 0 or G < 32) is written dense (its dequantized float weight; exact, not smaller).
config.json: the master's config without its `quantization_config`, plus `quantization` (and the same
block as `quantization_config`, as mlx-lm writes it) {group_size, bits, mode: affine} with per-module
overrides where a module differs; `rope_theta`/`rope_scaling` at top level (mlx-lm does not read
transformers 5's `rope_parameters`) and `tie_word_embeddings` written explicitly (mlx-lm defaults it to true).

Scales/biases dtype: fp32 (default, exact up to one fp32 rounding of s*q - s*Z), fp16 or bf16 (smaller;
the report gives the relative weight error that adds).

Python: `export_mlx(master, out, scale_dtype="fp32", overwrite=False) -> ExportReport`.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from converters.registry import (ExportReport, Exporter, TensorReport, choose, prepare_output, register,
                                 write_safetensors_dir)
from neuqi_export.errors import UserError
from neuqi_export.master import EMBED, HEAD

MLX_GROUP_SIZES = (128, 64, 32)
MLX_BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_NAME = "model.safetensors"


def mlx_group_size(in_features: int, group_size: int) -> int | None:
    """Largest MLX group size dividing both the master's effective group size and in_features (None: none)."""
    g = in_features if group_size == -1 else group_size
    for cand in MLX_GROUP_SIZES:
        if g % cand == 0 and in_features % cand == 0:
            return cand
    return None


def mlx_bits(bits: int) -> int | None:
    """Smallest MLX affine width that holds `bits`-bit codes."""
    for b in MLX_BITS:
        if b >= bits:
            return b
    return None


def pack_mlx(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (out, in) -> uint32 (out, in*bits/32): MLX's affine packing (little-endian bit stream)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    out, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    if codes.size and int(codes.max()) >= (1 << bits):
        raise ValueError(f"code {int(codes.max())} does not fit in {bits} bits")
    planes = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = np.packbits(planes.reshape(out, n * bits), axis=-1, bitorder="little")
    return np.ascontiguousarray(stream).view("<u4").astype(np.uint32, copy=False)


def unpack_mlx(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of pack_mlx: uint32 (out, words) -> uint8 codes (out, n)."""
    by = np.ascontiguousarray(packed.astype("<u4")).view(np.uint8)
    stream = np.unpackbits(by, axis=-1, bitorder="little")[..., : n * bits]
    planes = stream.reshape(*by.shape[:-1], n, bits).astype(np.uint16)
    return (planes << np.arange(bits, dtype=np.uint16)).sum(-1).astype(np.uint8)


def mlx_params(lin, gsize: int, scale_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, biases) (out, in/gsize) for the master linear re-expressed on MLX groups of `gsize`."""
    out, inp = lin.shape
    G = lin.effective_group_size
    idx = (torch.arange(inp // gsize) * gsize) // G  # master group of each MLX group
    s = lin.scale.float()[:, idx]
    z = lin.zero.float()[:, idx]
    return s.to(scale_dtype), (-s * z).to(scale_dtype)


def _rope_fields(cfg: dict) -> dict:
    """Top-level rope_theta / rope_scaling from transformers 5's rope_parameters (or the old fields)."""
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        theta = rp["rope_theta"]
        rtype = rp.get("rope_type", rp.get("type", "default"))
        scaling = None
        if rtype != "default":
            scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
            scaling["rope_type"] = rtype
            scaling.setdefault("type", rtype)
        return {"rope_theta": theta, "rope_scaling": scaling}
    if isinstance(rp, dict) and rp:  # per-layer-type rope parameters (gemma-like): not handled by mlx-lm llama
        raise UserError("this model has per-layer rope_parameters that the MLX exporter does not map; export it with another format")
    return {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_scaling": cfg.get("rope_scaling")}


def _tied(cfg: dict) -> bool:
    """tie_word_embeddings as transformers resolves it for this config (what master_to_hf uses)."""
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        return bool(getattr(AutoConfig.for_model(**c), "tie_word_embeddings", False))
    except Exception:
        return False


def mlx_config(master, quant: dict) -> dict:
    cfg = {k: v for k, v in master.config.items() if k != "quantization_config"}
    cfg.update(_rope_fields(cfg))
    cfg.pop("rope_parameters", None)
    cfg["tie_word_embeddings"] = _tied(master.config)
    cfg["quantization"] = quant
    cfg["quantization_config"] = dict(quant)  # mlx-lm writes both; neither carries a quant_method
    return cfg


def export_mlx(master, out, scale_dtype: str = "fp32", overwrite: bool = False) -> ExportReport:


    sdt = choose(scale_dtype, SCALE_DTYPES, "--mlx-scale-dtype")
    out = prepare_output(master, out, overwrite, "the MLX exporter")

    tensors: dict[str, torch.Tensor] = {}
    reports: list[TensorReport] = []
    per_module: dict[str, dict] = {}
    shared = master.head_shares_embedding  # tied quantized head: stored as the QuantizedEmbedding mlx-lm ties to
    for hf_name, lin in master.linears.items():
        lin.validate(hf_name)
        name = "model.embed_tokens" if shared and hf_name == HEAD else hf_name
        out_f, inp = lin.shape
        gsize, bits = mlx_group_size(inp, lin.group_size), mlx_bits(lin.bits)
        if gsize is None or bits is None:
            tensors[f"{name}.weight"] = lin.dequantize().float()
            per_module[name] = False
            reports.append(TensorReport(name, "F32 (dense)", True, note=f"in={inp}, group {lin.group_size}: no MLX group size fits"))
            continue
        tensors[f"{name}.weight"] = torch.from_numpy(pack_mlx(lin.codes.cpu().numpy(), bits))
        s, b = mlx_params(lin, gsize, sdt)
        tensors[f"{name}.scales"], tensors[f"{name}.biases"] = s.contiguous(), b.contiguous()
        per_module[name] = {"group_size": gsize, "bits": bits}
        note = []
        if gsize != lin.effective_group_size:
            note.append(f"master group {lin.group_size} as MLX groups of {gsize}")
        if bits != lin.bits:
            note.append(f"{lin.bits}-bit codes in a {bits}-bit container")
        err = 0.0
        if sdt != torch.float32:  # relative weight error of the narrower scale storage
            ref = lin.dequantize()
            got = s.float().repeat_interleave(gsize, 1) * lin.codes.float() + b.float().repeat_interleave(gsize, 1)
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            note.append(f"{scale_dtype} scales: rel. weight error {err:.2e}")
        reports.append(TensorReport(name, f"MLX-affine-{bits} g{gsize}", True, added_error=0.0, note="; ".join(note)))
    for k, v in master.tensors.items():
        if k == EMBED and shared:
            continue  # written above from the quantized head
        tensors[k] = v.detach().cpu().contiguous().clone()

    quantized = [m for m in per_module.values() if m]
    if quantized:
        pairs = [(m["group_size"], m["bits"]) for m in quantized]
        gs0, b0 = max(set(pairs), key=pairs.count)
    else:
        gs0, b0 = 64, 4
    quant = {"group_size": gs0, "bits": b0, "mode": "affine"}
    for name, m in per_module.items():
        if m is False or (m["group_size"], m["bits"]) != (gs0, b0):
            quant[name] = m if m is False else {**m, "mode": "affine"}
    config = mlx_config(master, quant)

    nbytes = write_safetensors_dir(out, tensors, config, master.tokenizer_dir, metadata={"format": "mlx", "neuqi_export": "mlx-1"})
    return ExportReport(path=out, bytes=nbytes, tensors=reports)


def add_arguments(p: argparse.ArgumentParser) -> None:
    if "--mlx-scale-dtype" not in getattr(p, "_option_string_actions", {}):
        p.add_argument("--mlx-scale-dtype", dest="mlx_scale_dtype", default="fp32", choices=tuple(SCALE_DTYPES),
                       help="mlx: dtype of scales/biases (default fp32 = exact; fp16/bf16 smaller)")


def export(master, out, args: argparse.Namespace) -> ExportReport:
    return export_mlx(master, out, scale_dtype=getattr(args, "mlx_scale_dtype", None) or "fp32",
                      overwrite=bool(getattr(args, "force", False) or getattr(args, "overwrite", False)))


register(Exporter(
    name="mlx",
    help="MLX affine safetensors for mlx-lm (Apple silicon / mlx[cpu]): exact (bias = -scale*zero)",
    add_arguments=add_arguments,
    export=export,
))

__all__ = ["export_mlx", "pack_mlx", "unpack_mlx", "mlx_group_size", "mlx_bits", "mlx_params"]
