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

Float storage (`--float-storage`, converters/float_storage.py; one option for every format):
- half (default): as mlx-lm's convert writes a model: the float weights (embedding, float head, norms) AND the
  scales/biases in the model's half dtype (float_storage.half_dtype: the config's bfloat16/float16; for a float32
  config bfloat16 when every float weight is a bf16 value, else float16, as for the fetched SmolLM2-135M and
  Gemma-3-270M), so mlx-lm computes in it. A bf16 checkpoint's float weights are exact in bf16; the scales/biases are rounded
  (the report gives each linear's relative weight error and marks it not exact).
- exact: float weights in the half dtype only where lossless, else fp32; scales/biases fp32 (exact up to one
  fp32 rounding of s*q - s*Z).
- fp32: everything fp32 (the layout before issue 24).
`--mlx-scale-dtype fp32|fp16|bf16` overrides the scales'/biases' dtype alone. Sizes and perplexities: docs/SIZES.md.

Python: `export_mlx(master, out, scale_dtype=None, overwrite=False, float_storage="half") -> ExportReport`.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from converters import float_storage, shards
from converters.float_storage import FLOAT_STORAGE, half_dtype, store
from converters.registry import (ExportReport, Exporter, TensorReport, choose, prepare_output, register,
                                 write_safetensors_dir)
from converters.shards import DEFAULT_MAX_SHARD_SIZE
from neuqi_export.archs import family_for
from neuqi_export.errors import UserError
from neuqi_export.master import EMBED, HEAD

MLX_GROUP_SIZES = (128, 64, 32)
MLX_BITS = (2, 3, 4, 5, 6, 8)
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_NAME = "model.safetensors"
_DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


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
        raise UserError(f"{cfg.get('model_type')}: per-layer rope_parameters are not mapped by the MLX exporter yet; "
                        "export it with gguf or onnx")
    return {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_scaling": cfg.get("rope_scaling")}


def check_family(cfg: dict) -> None:
    """UserError, before any output, for a model mlx-lm cannot run as transformers does (no model type for the
    family, sliding windows or soft-caps its code for the family does not apply, a layer pattern it cannot express)."""
    fam = family_for(cfg)
    if fam.mlx_type is None:
        raise UserError(f"mlx-lm has no model type for {fam.model_type}; export gguf or onnx instead")
    windows = sorted({a.window for a in fam.layer_attention(cfg) if a.window})
    if windows and not fam.mlx_sliding_window:
        raise UserError(f"mlx-lm's {fam.mlx_type} has no sliding-window attention (this model's layers use a window of "
                        f"{windows[0]} tokens), so its outputs would differ from the model's beyond that length; "
                        "export gguf or onnx instead")
    caps = {k: v for k, v in (("attn_logit_softcapping", fam.attn_softcap(cfg)),
                              ("final_logit_softcapping", fam.final_softcap(cfg))) if v}
    if caps and not fam.mlx_softcap:
        k, v = next(iter(caps.items()))
        raise UserError(f"mlx-lm's {fam.mlx_type} applies no logit soft-capping (this {fam.model_type} model has "
                        f"{k} {v:g}), so its outputs would differ; export gguf or onnx instead")
    if fam.mlx_window_pattern:
        _pattern_fields(cfg, fam)


def _pattern_fields(cfg: dict, fam) -> dict:
    """mlx-lm's periodic per-layer attention keys (sliding_window, sliding_window_pattern, rope_local_base_freq for
    the sliding layers, rope_theta / rope_scaling for the global ones) from Family.layer_attention; UserError where
    the config's layers follow no such period or use rotary settings mlx-lm's code for the family lacks."""
    layers = fam.layer_attention(cfg)
    n, name = len(layers), f"mlx-lm's {fam.mlx_type}"
    glob = [i for i, a in enumerate(layers) if a.window is None]
    if not glob:
        raise UserError(f"{name} needs a full-attention layer (this {fam.model_type} model has only sliding ones); "
                        "export gguf or onnx instead")
    period = glob[0] + 1
    if [i for i in range(n) if i % period == period - 1] != glob:
        raise UserError(f"{name} takes full-attention layers every sliding_window_pattern layers, but this model's are "
                        f"layers {glob}; export gguf or onnx instead")
    local, full = [a for a in layers if a.window], [a for a in layers if a.window is None]
    if any(a.rope is None for a in layers):
        raise UserError(f"{name} applies rotary embeddings on every layer (this model has NoPE layers); "
                        "export gguf or onnx instead")
    for group in (local, full):
        if any(a.rope != group[0].rope or a.window != group[0].window for a in group):
            raise UserError(f"{name} takes one window and one rope per layer kind, but this model's layers differ; "
                            "export gguf or onnx instead")
    if local and local[0].rope["rope_type"] != "default":
        raise UserError(f"{name} applies plain rope on sliding layers (this model's are "
                        f"{local[0].rope['rope_type']!r}); export gguf or onnx instead")
    rope = full[0].rope
    if rope["rope_type"] == "default":
        scaling = None
    elif rope["rope_type"] == "linear":
        scaling = {"type": "linear", "rope_type": "linear", "factor": float(rope["factor"])}
    else:
        raise UserError(f"{name} maps only default and linear rope scaling on full-attention layers (this model's is "
                        f"{rope['rope_type']!r}); export gguf or onnx instead")
    return {"sliding_window": int(local[0].window) if local else int(cfg.get("sliding_window") or 4096),
            "sliding_window_pattern": period, "rope_theta": float(rope["rope_theta"]),
            "rope_local_base_freq": float((local[0] if local else full[0]).rope["rope_theta"]), "rope_scaling": scaling,
            "query_pre_attn_scalar": float(fam.attention_scale(cfg)) ** -2}


def embed_scale_factor(cfg: dict) -> float:
    """bf16(s) / s for the family's embedding scale s where mlx-lm rounds it to bfloat16, else 1.0."""
    fam = family_for(cfg)
    if not fam.mlx_embed_scale_bf16:
        return 1.0
    s = float(fam.embedding_scale(cfg))
    return float(torch.tensor(s, dtype=torch.bfloat16).float()) / s


def compensate_embed_scale(tensors: dict, cfg: dict) -> None:
    """Make mlx-lm's bf16-rounded embedding scale exact: its residual stream is then r = bf16(s)/s times
    transformers', so the norms whose outputs add into it (attn_out, ffn_out) are stored scaled by r
    ((offset + w) r - offset); the norms reading it are scale-invariant (up to eps / mean(x^2), ~1e-9)."""
    r = embed_scale_factor(cfg)
    if r == 1.0:
        return
    fam = family_for(cfg)
    if fam.norms.attn_out is None or fam.norms.ffn_out is None:
        raise UserError(f"mlx-lm rounds {fam.model_type}'s embedding scale to bfloat16 and this family has no "
                        "residual-branch norms to absorb it; export gguf or onnx instead")
    off = fam.norm_offset
    for i in range(int(cfg["num_hidden_layers"])):
        for hf in (fam.norms.attn_out, fam.norms.ffn_out):
            k = f"{fam.blocks_path}.{i}.{hf}.weight"
            if k not in tensors:  # another block's part (export_mlx writes a block at a time)
                continue
            w = tensors[k].double()
            tensors[k] = ((off + w) * r - off).to(tensors[k].dtype)


def _stack_experts(tensors: dict, per_module: dict, cfg: dict) -> None:
    """In place: per-expert `<blk>.<experts>.<e>.<part>.*` -> mlx-lm's stacked `<blk>.<mlx_moe>.switch_mlp.<part>.*`
    (E, ...) and the router `<blk>.<router>` -> `<blk>.<mlx_moe>.gate` (what mlx-lm's qwen3_moe / mixtral load)."""
    import re

    from neuqi_export.experts import num_experts

    fam = family_for(cfg)
    if fam.experts is None:
        return
    n_exp = num_experts(cfg)
    pat = re.compile(rf"^(.*\.\d+)\.{re.escape(fam.experts)}\.0\.(\w+)$")
    for name in [n for n in per_module if pat.match(n)]:
        block, part = pat.match(name).groups()
        new = f"{block}.{fam.mlx_moe}.switch_mlp.{part}"
        names = [f"{block}.{fam.experts}.{e}.{part}" for e in range(n_exp)]
        kinds = {str(per_module[n]) for n in names}
        if len(kinds) != 1:
            raise UserError(f"{name}: the experts of one layer are quantized differently ({sorted(kinds)}), which "
                            "mlx-lm's stacked experts cannot hold; re-quantize with one bit width and group size")
        for suffix in ("weight", "scales", "biases"):
            if f"{names[0]}.{suffix}" in tensors:
                tensors[f"{new}.{suffix}"] = torch.stack([tensors.pop(f"{n}.{suffix}") for n in names])
        per_module[new] = per_module[names[0]]
        for n in names:
            del per_module[n]
    for name in [k for k in tensors if re.match(rf"^.*\.\d+\.{re.escape(fam.router)}\.(weight|bias)$", k)]:
        tensors[name.replace(f".{fam.router}.", f".{fam.mlx_moe}.gate.")] = tensors.pop(name)


def mlx_config(master, quant: dict) -> dict:
    cfg = {k: v for k, v in master.config.items() if k != "quantization_config"}
    fam = family_for(cfg)
    if fam.experts is not None:  # mlx-lm reads num_experts (qwen3_moe) / num_local_experts (mixtral)
        from neuqi_export.experts import num_experts

        cfg["num_experts"] = cfg["num_local_experts"] = num_experts(cfg)
    cfg["model_type"] = fam.mlx_type
    cfg.update(_pattern_fields(cfg, fam) if fam.mlx_window_pattern else _rope_fields(cfg))
    cfg.pop("rope_parameters", None)
    cfg["tie_word_embeddings"] = master.head_is_embedding
    cfg["quantization"] = quant
    cfg["quantization_config"] = dict(quant)  # mlx-lm writes both; neither carries a quant_method
    return cfg


def _linear(tensors: dict, per_module: dict, reports: list, hf_name: str, lin, shared: bool, float_storage: str,
            half, sdt, scale_dtype: str) -> None:
    """Linear `hf_name` into `tensors` as MLX affine weight/scales/biases (or dense where no MLX group fits), its
    layout into `per_module` and its report into `reports`."""
    lin.validate(hf_name)
    name = "model.embed_tokens" if shared and hf_name == HEAD else hf_name
    out_f, inp = lin.shape
    gsize, bits = mlx_group_size(inp, lin.group_size), mlx_bits(lin.bits)
    if gsize is None or bits is None:
        tensors[f"{name}.weight"], ok = store(lin.dequantize(), float_storage, half)
        per_module[name] = False
        reports.append(TensorReport(name, f"{_DT[tensors[f'{name}.weight'].dtype]} (dense)", ok,
                                    note=f"in={inp}, group {lin.group_size}: no MLX group size fits"))
        return
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
    if sdt != torch.float32:  # relative weight error of the narrower scale storage (0: the values fit it)
        ref = lin.dequantize()
        got = s.float().repeat_interleave(gsize, 1) * lin.codes.float() + b.float().repeat_interleave(gsize, 1)
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        if err:
            note.append(f"{scale_dtype} scales/biases: rel. weight error {err:.2e} (--float-storage exact keeps fp32)")
    reports.append(TensorReport(name, f"MLX-affine-{bits} g{gsize}", err == 0.0, added_error=err, note="; ".join(note)))


def export_mlx(master, out, scale_dtype: str | None = None, overwrite: bool = False,
               float_storage: str = "half", max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> ExportReport:
    """Write `master` as an mlx-lm directory (module doc). `float_storage` (converters.float_storage): half
    (default) stores the float weights and the scales/biases in the model's half dtype, as mlx-lm writes its
    models; exact keeps the float weights half where lossless and the scales/biases fp32; fp32 all fp32.
    `scale_dtype` (fp32|fp16|bf16) overrides the scales'/biases' dtype."""
    choose(float_storage, dict.fromkeys(FLOAT_STORAGE), "--float-storage")
    half = half_dtype(master.config, master.tensors)
    if scale_dtype is None:
        sdt = half if float_storage == "half" else torch.float32
        scale_dtype = next(k for k, v in SCALE_DTYPES.items() if v == sdt)
    sdt = choose(scale_dtype, SCALE_DTYPES, "--mlx-scale-dtype")
    check_family(master.config)
    out = prepare_output(out, overwrite)

    reports: list[TensorReport] = []
    per_module: dict[str, dict] = {}
    shared = master.head_shares_embedding  # tied quantized head: stored as the QuantizedEmbedding mlx-lm ties to
    names = [*master.linears, *(k for k in master.tensors if not (k == EMBED and shared))]  # EMBED: from the head

    def pieces():
        """The tensors a block at a time (converters.shards.by_block), so one block is held, not the model."""
        for group in shards.by_block(names, family_for(master.config).blocks_path):
            part, floats = {}, {}
            for n in group:
                if n in master.linears:
                    _linear(part, per_module, reports, n, master.linears[n], shared, float_storage, half, sdt,
                            scale_dtype)
                else:
                    floats[n] = master.tensors[n].detach().cpu().float().contiguous().clone()
            compensate_embed_scale(floats, master.config)
            for k, v in floats.items():
                part[k], ok = store(v, float_storage, half)
                if not ok:
                    reports.append(TensorReport(k, _DT[part[k].dtype], False,
                                                note=f"rounded to {_DT[half]} (--float-storage exact keeps it exact)"))
            _stack_experts(part, per_module, master.config)
            for k in list(part):
                yield k, part.pop(k)

    def config() -> dict:
        """config.json, once every module's layout is known."""
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
        return mlx_config(master, quant)

    nbytes = write_safetensors_dir(out, pieces(), config, master.tokenizer_dir,
                                   metadata={"format": "mlx", "neuqi_export": "mlx-1"}, max_shard_size=max_shard_size)
    return ExportReport(path=out, bytes=nbytes, tensors=reports)


def add_arguments(p: argparse.ArgumentParser) -> None:
    if "--mlx-scale-dtype" not in getattr(p, "_option_string_actions", {}):
        p.add_argument("--mlx-scale-dtype", dest="mlx_scale_dtype", default=None, choices=tuple(SCALE_DTYPES),
                       help="mlx: dtype of scales/biases (default: the model's half dtype with --float-storage half, "
                            "fp32 = exact with exact/fp32)")
    float_storage.add_option(p)
    shards.add_option(p)


def options_from_args(args: argparse.Namespace) -> dict:
    """export_mlx()'s keyword options from the parsed `--to mlx` CLI options (add_arguments)."""
    return {"scale_dtype": args.mlx_scale_dtype, "float_storage": args.float_storage,
            "max_shard_size": args.max_shard_size}


register(Exporter(
    name="mlx",
    help="MLX affine safetensors for mlx-lm (Apple silicon / mlx[cpu]): exact (bias = -scale*zero)",
    add_arguments=add_arguments,
    write=export_mlx,
    options_from_args=options_from_args,
    head_bits=8,  # convert's default: 8-bit head, -26% file at +0.08% perplexity on SmolLM2 (docs/SIZES.md)
))

__all__ = ["export_mlx", "pack_mlx", "unpack_mlx", "mlx_group_size", "mlx_bits", "mlx_params"]
