"""compressed-tensors exporter (transformers, vLLM, llm-compressor): `pack-quantized` safetensors with
asymmetric INTEGER zero-points.

    neuqi-export export MASTER --to compressed-tensors -o DIR [--ct-scale-dtype fp32|fp16|bf16]
                                                             [--ct-refit none|rtn|diag] [--float-storage half|exact|fp32]

Output directory: model.safetensors, config.json (the master's config with a compressed-tensors
`quantization_config`), the master's tokenizer files; written to a temp dir beside DIR, then renamed.

Per quantized linear `<m>`: `<m>.weight_packed` int32 (out, ceil(in*bits/32)) -- codes shifted to the signed
range (q - 2^(bits-1)) and packed as compressed-tensors >= 0.18 does: a dense little-endian bit stream along
the input dimension, 32 codes in `bits` words (for 2/4/8 bits this is also what older versions wrote; 3-bit
codes straddle words and are read correctly ONLY by compressed-tensors >= 0.18 -- before 0.18 ten 3-bit codes
went into each int32 with 2 spare bits) --, `<m>.weight_scale` (out, n_groups), `<m>.weight_zero_point` int32
(ceil(out*bits/32), n_groups) (signed zero-points packed the same way along the output dimension),
`<m>.weight_shape` int64 [out, in]. Dequant: scale * (q - zp).

Groups: compressed-tensors needs in % group_size == 0 (and vLLM's kernels group sizes 32/64/128): the master's
groups are re-expressed on the largest of 128/64/32 dividing both the master group size and in_features
(SmolLM2: in=576 with g128 -> groups of 64; exact, each 64-wide piece repeats its group's parameters);
per-channel masters use the `channel` strategy. A linear with no such group size is written dense (float
weight, listed in `ignore`).

Exact by default: `convert --to compressed-tensors` quantizes with integer zero-points (`--init neuqi_int`, NeUQI's
scale search with Z restricted to the integers; Exporter.init below), which this format holds exactly (with the fp32
weight_scale default). The format cannot hold NeUQI's float zero-point, so a float-zero-point master (`quantize`'s
default `--init neuqi`) is REFIT on export, with one warning giving the error it measured and the exact route: per
(row, group) the integer zero-point Z' in {round(Z)-2 .. round(Z)+2} (clamped to 0..2^bits-1) and the scale s'
are chosen to minimise the diag-H objective sum_j h_j (s'(q_j - Z') - w_j)^2 against the master's dequantized
weights w (h = the master's hdiag): for a fixed (s', Z') the best codes are clamp(round(w/s' + Z')), for fixed
codes the best s' is the weighted least-squares one; a few alternations, best candidate kept
(`--ct-refit diag`, default). `--ct-refit rtn`: Z' = round(Z), s' = s, codes re-rounded (the plain baseline).
The report gives, per tensor, the added error sum h (w' - w)^2 / sum h w^2 (relative, diag-H weighted).

Float tensors (`--float-storage`, converters/float_storage.py): the embedding (which holds a tied head's values:
the head stays float in this format), norms and dense linears in the model's dtype (half, default: exact for a
bf16 checkpoint's own weights, rounded otherwise and marked so), half only where lossless (exact), or fp32.

Loading: transformers 5 reads asymmetric pack-quantized only dequantized:
`from_pretrained(DIR, quantization_config=CompressedTensorsConfig(dequantize=True))` (runtimes.transformers
does this); vLLM runs 4/8-bit asymmetric group checkpoints with its own kernels.

Python: `export_compressed_tensors(master, out, scale_dtype="fp32", refit="diag", overwrite=False,
float_storage="half") -> ExportReport`.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from converters import float_storage, shards
from converters.float_storage import FLOAT_STORAGE, half_dtype, store
from converters.registry import (ExportReport, Exporter, TensorReport, choose, prepare_output, register,
                                 write_safetensors_dir)
from converters.shards import DEFAULT_MAX_SHARD_SIZE
from neuqi_export.archs import family_for
from neuqi_export.errors import UserError
from neuqi_export.experts import fuse_state_dict, is_expert
from neuqi_export.master import HEAD

GROUP_SIZES = (128, 64, 32)
# why a mixture-of-experts master's experts are written float (dense, per expert under the checkpoint's names)
EXPERTS_NOTE = ("experts written float: transformers (5.24) dequantizes fused MoE experts without their "
                "weight_zero_point (integrations/compressed_tensors.py CompressedTensorsDequantize), so asymmetric "
                "pack-quantized experts do not load")
SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REFITS = ("diag", "rtn", "none")
WEIGHTS_NAME = "model.safetensors"
_DT = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
FORMAT = "pack-quantized"


def ct_group_size(in_features: int, group_size: int) -> int | None:
    """-1 (channel strategy) for per-channel masters, else the largest of 128/64/32 dividing G and in (None: none)."""
    if group_size == -1 or group_size >= in_features:
        return -1
    for cand in GROUP_SIZES:
        if group_size % cand == 0 and in_features % cand == 0:
            return cand
    return None


def shared_group_size(shapes: list[tuple[int, int]]) -> int | None:
    """One group size for linears of (in_features, group_size): transformers' dequantizing loader applies ONE
    scheme to every dense linear. -1 (channel) when all are per-channel, else the largest of 128/64/32
    dividing every in_features and effective group size (per-channel rows become repeated groups)."""
    if all(ct_group_size(i, g) == -1 for i, g in shapes):
        return -1
    for cand in GROUP_SIZES:
        if all(i % cand == 0 and (i if g == -1 else g) % cand == 0 for i, g in shapes):
            return cand
    return None


# --------------------------------------------------------------------------------------------- packing

def pack_int32(values: np.ndarray, bits: int, packed_dim: int = 1) -> np.ndarray:
    """Signed codes in -2^(bits-1)..2^(bits-1)-1 (2-d) -> int32 packed along `packed_dim` (compressed-tensors
    >= 0.18 layout: value + 2^(bits-1) as a dense little-endian bit stream, 32 values per `bits` words)."""
    v = np.asarray(values, dtype=np.int64) + (1 << (bits - 1))
    if v.size and (v.min() < 0 or v.max() >= (1 << bits)):
        raise ValueError(f"values do not fit in {bits} signed bits")
    if packed_dim == 0:
        v = v.T
    rows, cols = v.shape
    words = math.ceil(cols * bits / 32)
    pad = words * 32 - cols * bits  # in bits
    planes = (v.astype(np.uint8)[..., None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = planes.reshape(rows, cols * bits)
    if pad:
        stream = np.concatenate([stream, np.zeros((rows, pad), np.uint8)], axis=1)
    packed = np.packbits(stream, axis=-1, bitorder="little").view("<u4").view(np.int32).reshape(rows, words)
    return np.ascontiguousarray(packed.T if packed_dim == 0 else packed)


def unpack_int32(packed: np.ndarray, bits: int, n: int, packed_dim: int = 1) -> np.ndarray:
    """Inverse of pack_int32: signed int8 values, `n` along `packed_dim`."""
    p = np.asarray(packed, dtype=np.int32)
    if packed_dim == 0:
        p = p.T
    by = np.ascontiguousarray(p.astype("<i4")).view(np.uint8)
    stream = np.unpackbits(by, axis=-1, bitorder="little")[:, : n * bits]
    v = (stream.reshape(p.shape[0], n, bits).astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(-1)
    v = (v - (1 << (bits - 1))).astype(np.int8)
    return v.T if packed_dim == 0 else v


# ----------------------------------------------------------------------------------------------- refit

def refit_integer_zero(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                       gsize: int, method: str = "diag", iters: int = 4, scale_dtype=torch.float32):
    """Integer zero-points for target weights w (out, in) on groups of `gsize` (in % gsize == 0).

    scale/zero: (out, in/gsize) starting parameters. Returns (codes uint8 (out, in), scale (out, ng) in
    scale_dtype, zero int64 (out, ng)) minimising sum h (s (q - Z) - w)^2 per group (see module doc)."""
    maxq = (1 << bits) - 1
    out, inp = w.shape
    ng = inp // gsize
    W = w.double().reshape(out, ng, gsize)
    H = h.double().clamp_min(0).reshape(1, ng, gsize).expand(out, ng, gsize)
    s0 = scale.double().reshape(out, ng, 1)
    z0 = zero.double().reshape(out, ng, 1)

    def codes_for(s, Z):
        return torch.clamp(torch.round(W / s + Z), 0, maxq)

    def stored(s):
        return s.to(scale_dtype).double()

    def err_of(s, q, Z):
        return (H * (s * (q - Z) - W) ** 2).sum(-1, keepdim=True)

    if method == "rtn":
        Z = torch.clamp(torch.round(z0), 0, maxq)
        s = stored(s0)
        q = codes_for(s, Z)
        return q.reshape(out, inp).to(torch.uint8), s.reshape(out, ng).to(scale_dtype), Z.reshape(out, ng).long()

    best_e = torch.full((out, ng, 1), math.inf, dtype=torch.float64)
    best_s, best_z, best_q = stored(s0).clone(), torch.zeros_like(z0), torch.zeros_like(W)
    base = torch.round(z0)
    for dz in (0, 1, -1, 2, -2):  # nearest first: on a tie (e.g. h = 0 over a group) the nearest integer wins
        Z = torch.clamp(base + dz, 0, maxq)
        s = stored(s0)
        q = codes_for(s, Z)
        e = err_of(s, q, Z)
        for _ in range(iters):
            d = q - Z
            den = (H * d * d).sum(-1, keepdim=True)
            num = (H * W * d).sum(-1, keepdim=True)
            s_new = torch.where((den > 0) & (num > 0), num / den.clamp_min(1e-300), s)
            s_new = stored(s_new)
            s_new = torch.where(s_new > 0, s_new, s)
            q_new = codes_for(s_new, Z)
            e_new = err_of(s_new, q_new, Z)
            better = e_new < e
            s, q, e = torch.where(better, s_new, s), torch.where(better, q_new, q), torch.where(better, e_new, e)
        take = e < best_e
        best_e = torch.where(take, e, best_e)
        best_s, best_z, best_q = torch.where(take, s, best_s), torch.where(take, Z, best_z), torch.where(take, q, best_q)
    return (best_q.reshape(out, inp).to(torch.uint8), best_s.reshape(out, ng).to(scale_dtype),
            best_z.reshape(out, ng).long())


# ---------------------------------------------------------------------------------------------- export

def _linear_modules(cfg: dict) -> list[str] | None:
    """Names of every nn.Linear in the transformers model of this config (built on the meta device): for masters
    written before quantize recorded them (MasterCheckpoint.linear_modules)."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        c = {k: v for k, v in cfg.items() if k != "quantization_config"}
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**c))
        return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    except Exception:
        return None


def _weights_args(bits: int, gsize: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": False, "dynamic": False,
            "strategy": "channel" if gsize == -1 else "group", "group_size": None if gsize == -1 else gsize,
            "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:
        return "0.18.0"


def _linear(tensors: dict, reports: list, schemes: dict, dense: list, name: str, lin, head_tied: bool, shared: dict,
            float_storage: str, half, sdt, refit: str) -> None:
    """Linear `name` into `tensors` as pack-quantized weight_packed / weight_scale / weight_zero_point / weight_shape
    (refit to integer zero-points per `refit`), or dense where no group size fits (or the head); its report into
    `reports`, its name into `schemes[(bits, group)]` or `dense`."""
    from neuqi_export.quant.grid import expand_groups

    lin.validate(name)
    head_note = "transformers' compressed-tensors loader leaves lm_head unquantized (its packed weights would be dropped)"
    out_f, inp = lin.shape
    if name == HEAD and head_tied:  # tied: the embedding written below holds its values
        reports.append(TensorReport(name, "tied embedding", True, note=head_note))
        return
    g = shared[lin.bits] if ct_group_size(inp, lin.group_size) is not None else None
    if g is None or name == HEAD:
        tensors[f"{name}.weight"], ok = store(lin.dequantize(), float_storage, half)
        dense.append(name)
        why = head_note if name == HEAD else f"in={inp}, group {lin.group_size}: no group size 32/64/128 fits"
        reports.append(TensorReport(name, f"{_DT[tensors[f'{name}.weight'].dtype]} (dense)", ok, note=why))
        return
    # the master's weights in float64 (so an integer-zero master refits with exactly zero added error)
    w = (expand_groups(lin.scale.double(), inp, lin.effective_group_size)
         * (lin.codes.double() - expand_groups(lin.zero.double(), inp, lin.effective_group_size)))
    geff = inp if g == -1 else g
    # master parameters re-expressed on the export's groups (exact before the integer refit)
    cols = torch.arange(0, inp, geff)
    scale = expand_groups(lin.scale.float(), inp, lin.effective_group_size)[:, cols]
    zero = expand_groups(lin.zero.float(), inp, lin.effective_group_size)[:, cols]
    h = lin.hdiag.float() if lin.hdiag is not None else torch.ones(inp)
    if refit == "none":
        if not torch.equal(zero, torch.round(zero)):
            raise UserError(f"{name}: the master's zero-points are not integers and --ct-refit none was given; use --ct-refit diag")
        codes, s, z = lin.codes, scale.to(sdt), zero.long()
    else:
        codes, s, z = refit_integer_zero(w, h, scale, zero, lin.bits, geff, method=refit, scale_dtype=sdt)
    off = 1 << (lin.bits - 1)
    tensors[f"{name}.weight_packed"] = torch.from_numpy(pack_int32(codes.numpy().astype(np.int16) - off, lin.bits))
    tensors[f"{name}.weight_scale"] = s.contiguous()
    tensors[f"{name}.weight_zero_point"] = torch.from_numpy(pack_int32(z.numpy() - off, lin.bits, packed_dim=0))
    tensors[f"{name}.weight_shape"] = torch.tensor([out_f, inp], dtype=torch.int64)
    w2 = s.double().repeat_interleave(geff, 1) * (codes.double() - z.double().repeat_interleave(geff, 1))
    hh = h.double()[None]
    added = float((hh * (w2 - w) ** 2).sum() / (hh * w ** 2).sum().clamp_min(1e-300))
    note = f"groups of {geff}" if geff != lin.effective_group_size else ""
    if 32 % lin.bits:
        note = (note + "; " if note else "") + f"{lin.bits}-bit packing needs compressed-tensors >= 0.18"
    reports.append(TensorReport(name, f"int{lin.bits}-asym-{'channel' if g == -1 else f'g{g}'}", added == 0.0,
                                added_error=added, note=note))
    schemes.setdefault((lin.bits, g), []).append(name)


def export_compressed_tensors(master, out, scale_dtype: str = "fp32", refit: str = "diag",
                              overwrite: bool = False, float_storage: str = "half",
                              max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> ExportReport:
    """Write `master` as a pack-quantized directory (module doc). `float_storage` (converters.float_storage):
    the float tensors (embedding, float head, norms, dense linears) in the model's dtype (half, default; exact
    for a bf16 checkpoint's own weights), half only where lossless (exact), or fp32; weight_scale follows
    `scale_dtype` (fp32 default: an integer-zero-point master's scales exactly)."""
    choose(float_storage, dict.fromkeys(FLOAT_STORAGE), "--float-storage")
    half = half_dtype(master.config, master.tensors)
    sdt = choose(scale_dtype, SCALE_DTYPES, "--ct-scale-dtype")
    choose(refit, dict.fromkeys(REFITS), "--ct-refit")
    out = prepare_output(out, overwrite)

    reports: list[TensorReport] = []
    schemes: dict[tuple[int, int], list[str]] = {}
    dense: list[str] = []
    shared = {}
    layouts = {n: master.layout(n) for n in master.linears}  # no linear read to tell its bits and groups
    for bits in sorted({m["bits"] for m in layouts.values()}):
        fits = [(m["shape"][1], m["group_size"]) for n, m in layouts.items()
                if m["bits"] == bits and ct_group_size(m["shape"][1], m["group_size"]) is not None and n != HEAD]
        shared[bits] = shared_group_size(fits) if fits else None
    fam = family_for(master.config)
    opts = dict(float_storage=float_storage, half=half, sdt=sdt, refit=refit)

    def pieces():
        """The tensors a block at a time (converters.shards.by_block), so one block is held, not the model."""
        for group in shards.by_block([*master.linears, *master.tensors], fam.blocks_path):
            part, experts_float = {}, {}
            for n in group:
                if n not in master.linears:
                    part[n], ok = store(master.tensors[n], float_storage, half)
                    if not ok:
                        reports.append(TensorReport(n, _DT[part[n].dtype], False,
                                                    note=f"rounded to {_DT[half]} (--float-storage exact keeps it exact)"))
                elif is_expert(fam, n):  # float, fused as transformers 5 holds them (EXPERTS_NOTE)
                    lin = master.linears[n]
                    lin.validate(n)
                    experts_float[n], ok = store(lin.dequantize(), float_storage, half)
                    reports.append(TensorReport(n, f"{_DT[experts_float[n].dtype]} (dense)", ok, note=EXPERTS_NOTE))
                else:
                    _linear(part, reports, schemes, dense, n, master.linears[n], master.head_shares_embedding,
                            shared, **opts)
            part.update(fuse_state_dict({f"{n}.weight": w for n, w in experts_float.items()}))
            for k in list(part):
                yield k, part.pop(k)

    def config() -> dict:
        """config.json, once every linear's scheme is known."""
        all_linear = master.linear_modules or _linear_modules(master.config)  # older masters: ask transformers
        groups = {}
        if len(schemes) == 1 and all_linear is not None:
            (bits, g), names = next(iter(schemes.items()))
            groups["group_0"] = {"targets": ["Linear"], "weights": _weights_args(bits, g), "input_activations": None,
                                 "output_activations": None, "format": FORMAT}
            ignore = [n for n in all_linear if n not in set(names)]
        else:
            for i, ((bits, g), names) in enumerate(sorted(schemes.items())):
                groups[f"group_{i}"] = {"targets": [f"re:^{n.replace('.', chr(92) + '.')}$" for n in names],
                                        "weights": _weights_args(bits, g), "input_activations": None,
                                        "output_activations": None, "format": FORMAT}
            ignore = ["lm_head", *dense] if all_linear is None else [n for n in all_linear if n not in master.linears or n in dense]
        qcfg = {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
                "config_groups": groups, "ignore": sorted(set(ignore)), "kv_cache_scheme": None,
                "version": _ct_version()}
        return {**{k: v for k, v in master.config.items() if k != "quantization_config"}, "quantization_config": qcfg}

    nbytes = write_safetensors_dir(out, pieces(), config, master.tokenizer_dir, metadata={"format": "pt", "neuqi_export": "compressed-tensors-1"},
                                  max_shard_size=max_shard_size)
    return ExportReport(path=out, bytes=nbytes, tensors=reports, advice=refit_warning(reports))


def refit_warning(reports: list[TensorReport]) -> str:
    """One warning line for an export that refit float zero-points: how many linears, the error it measured
    (diag-H weighted, relative: mean and max over them) and the exact route; "" when nothing was refit."""
    refit = [t for t in reports if t.type.startswith("int") and not t.exact]
    if not refit:
        return ""
    errs = [t.added_error for t in refit]
    return (f"warning: compressed-tensors holds integer zero-points only, so this master's float zero-points were "
            f"refit in {len(refit)} linears (added diag-H weighted weight error: mean {sum(errs) / len(errs):.3g}, "
            f"max {max(errs):.3g}; 0 when exact); for an exact file quantize with --init neuqi_int "
            "(`neuqi-export quantize MODEL --init neuqi_int`, or `neuqi-export convert MODEL --to compressed-tensors`, "
            "its default)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    taken = getattr(p, "_option_string_actions", {})
    if "--ct-scale-dtype" not in taken:
        p.add_argument("--ct-scale-dtype", dest="ct_scale_dtype", default="fp32", choices=tuple(SCALE_DTYPES),
                       help="compressed-tensors: dtype of weight_scale (default fp32)")
    if "--ct-refit" not in taken:
        p.add_argument("--ct-refit", dest="ct_refit", default="diag", choices=REFITS,
                       help="compressed-tensors: integer zero-point refit: diag = diag-H optimal (default), rtn = round Z, "
                            "none = refuse non-integer zero-points")
    float_storage.add_option(p)
    shards.add_option(p)


def options_from_args(args: argparse.Namespace) -> dict:
    """export_compressed_tensors()'s keyword options from the parsed `--to compressed-tensors` CLI options."""
    return {"scale_dtype": args.ct_scale_dtype, "refit": args.ct_refit, "float_storage": args.float_storage,
            "max_shard_size": args.max_shard_size}


register(Exporter(
    name="compressed-tensors",
    help="compressed-tensors pack-quantized safetensors (transformers/vLLM): integer zero-points, diag-H refit",
    add_arguments=add_arguments,
    write=export_compressed_tensors,
    options_from_args=options_from_args,
    init="neuqi_int",  # integer zero-points: the file is exact (convert's default; docs/SIZES.md)
))

__all__ = ["export_compressed_tensors", "pack_int32", "unpack_int32", "refit_integer_zero", "ct_group_size"]
