"""Master checkpoint -> one GGUF file (written to a temp file beside the target, then renamed)."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np

from converters.registry import ExportReport, TensorReport
from neuqi_export.atomic import atomic_file
from neuqi_export.errors import UserError
from neuqi_export.master import HEAD, GGUFLinear

from . import metadata
from .exact import LEGACY_TYPES, NotRepresentable, PackedTensor, master_dequant, pack_exact, weighted_error
from .kquants import K_TYPES, refit_k, refit_legacy
from .packers import QK, QK_K, quantize_q6_k, quantize_q8_0

# --type -> (max master bits, general.file_type)
WEIGHT_TYPES = {
    "Q4_1": (4, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q5_1": (5, gguf.LlamaFileType.MOSTLY_Q5_1),
    "F16": (16, gguf.LlamaFileType.MOSTLY_F16),  # linears stored dequantized (the master's values in fp16)
    "F32": (32, gguf.LlamaFileType.ALL_F32),
}
FLOAT_TYPES = ("auto", "F32", "F16", "Q8_0", "Q6_K", "Q4_1", "Q5_1")
_ARCH_ENUM = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_SKIP = re.compile(r"rotary_emb\.inv_freq$")


def register_weight_type(name: str, max_bits: int, file_type) -> None:
    """Used by the K-quant module to add its types."""
    WEIGHT_TYPES[name] = (max_bits, file_type)


def rope_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k layout into GGML's interleaved pairs (llama arch).

    Within each head of hd rows, GGML row 2i+j is HF row j*hd/2 + i.
    """
    hd = n_rows // n_head
    if hd * n_head != n_rows or hd % 2:
        raise UserError(f"q/k rows {n_rows} do not split into {n_head} heads of even size; the config does not match the weights")
    h = np.arange(n_head)[:, None, None]
    i = np.arange(hd // 2)[None, :, None]
    j = np.arange(2)[None, None, :]
    return (h * hd + j * (hd // 2) + i).reshape(-1)


def _float_tensor(w: np.ndarray, qtype: str) -> PackedTensor:
    """An unquantized master tensor (embedding / output head) stored as qtype."""
    w = np.asarray(w, np.float32)
    rows, n = w.shape
    if qtype == "F32":
        return PackedTensor(w, "F32", True, 0.0, 0.0, "float")
    if qtype == "F16":
        data = w.astype(np.float16)
        if not np.isfinite(data).all():
            raise UserError("a weight exceeds the fp16 range; choose --embed-type/--output-type F32 or Q8_0")
        back = data.astype(np.float32)
    elif qtype == "Q8_0":
        if n % QK:
            raise UserError(f"Q8_0 needs a row length divisible by {QK} (got {n}); choose F16")
        data = quantize_q8_0(w)
        back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0)
    elif qtype == "Q6_K":
        if n % QK_K:
            raise UserError(f"Q6_K needs a row length divisible by {QK_K} (got {n}); choose Q8_0 or F16")
        data = quantize_q6_k(w)
        back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q6_K)
    elif qtype in ("Q4_1", "Q5_1"):
        if n % QK:
            raise UserError(f"{qtype} needs a row length divisible by {QK} (got {n}); choose F16")
        t = gguf.GGMLQuantizationType[qtype]
        data = gguf.quants.quantize(w, t)  # min-max round-to-nearest, as llama-quantize without imatrix
        back = gguf.quants.dequantize(data, t)
    else:
        from .presets import BLOCK, EXTRA_TYPES, refit_extra  # types a preset's plan may ask for

        if qtype in EXTRA_TYPES and n % BLOCK[qtype] == 0:
            return refit_extra(w, None, qtype, "from float (unquantized in the master)")
        if qtype in ("Q2_K", "Q3_K", "Q4_K") and n % QK_K == 0:
            return refit_k(w.astype(np.float64), None, qtype, 8, n)
        raise UserError(f"unknown tensor type {qtype!r}; use one of {', '.join(FLOAT_TYPES[1:])}")
    err, rel = weighted_error(w, back, np.ones(n))
    return PackedTensor(data, qtype, False, err, rel, "from float (unquantized in the master)")


def default_output_type(n_embd: int) -> str:
    """llama-quantize's rule for output.weight (and a tied token_embd): Q6_K, or Q8_0 when the row is not a multiple of 256."""
    return "Q6_K" if n_embd % QK_K == 0 else "Q8_0"


def _pack_linear(lin, qtype: str, perm: np.ndarray | None) -> PackedTensor:
    """A master linear (codes, scale, zero) as qtype: Q4_1/Q5_1 exact when its codes fit, else refit on diag(H)."""
    codes = lin.codes.cpu().numpy().astype(np.uint8)
    scale = lin.scale.float().cpu().numpy()
    zero = lin.zero.float().cpu().numpy()
    if perm is not None:
        codes, scale, zero = codes[perm], scale[perm], zero[perm]
    hdiag = None if lin.hdiag is None else lin.hdiag.float().cpu().numpy()
    g = lin.effective_group_size
    if qtype in LEGACY_TYPES:
        try:
            return pack_exact(codes, scale, zero, g, lin.bits, hdiag, qtype)
        except NotRepresentable as exc:
            why = str(exc)
        return refit_values(master_dequant(codes, scale, zero, g), hdiag, qtype, why, undivided=why)
    w = master_dequant(codes, scale, zero, g)
    if qtype not in K_TYPES or w.shape[1] % QK_K == 0:
        return refit_values(w, hdiag, qtype, k_seed=(lin.bits, g, scale, zero))
    # like llama-quantize, a row that is not a multiple of 256 gets a legacy type: Q4_1 (exact when the
    # master fits it), else Q5_1 exact, else a Q4_1 refit
    why = f"input dim {w.shape[1]} is not a multiple of {QK_K}"
    for legacy in ("Q4_1", "Q5_1"):
        try:
            pt = pack_exact(codes, scale, zero, g, lin.bits, hdiag, legacy)
            pt.note = f"{legacy} instead of {qtype} ({why}); codes exact"
            return pt
        except NotRepresentable:
            pass
    pt = refit_values(w, hdiag, "Q4_1", why, undivided=why)
    if pt.qtype == "Q4_1":
        pt.note = f"Q4_1 refit instead of {qtype} ({why})"
    return pt


def _pack_typed(lin: GGUFLinear, qtype: str, perm: np.ndarray | None) -> PackedTensor:
    """A linear already quantized for a GGUF type: its blocks as they are (rows permuted for rope), or, when
    the export asks for another type, a refit of its values on its diag(H)."""
    from .presets import BLOCK, fallback_type

    n = lin.shape[1]
    asked = qtype
    if qtype in BLOCK:  # a type whose block does not divide the row: llama-quantize's fallback type for it
        qtype = fallback_type(qtype, n)
    if lin.qtype == qtype:
        data = lin.data.cpu().numpy()
        return PackedTensor(data if perm is None else data[perm], qtype, True, 0.0, 0.0,
                            "exact (quantized on this type's lattice)"
                            + ("" if asked == qtype else f"; {qtype} is the fallback of {asked} for input dim {n}"))
    w = lin.dequantize().double().numpy()
    w = w if perm is None else w[perm]
    hdiag = None if lin.hdiag is None else lin.hdiag.float().cpu().numpy()
    note = f"refit from {lin.qtype}" + ("" if asked == qtype else f" ({qtype}: the fallback of {asked} for input dim {n})")
    return refit_values(w, hdiag, qtype, note, f16_why=note if asked != qtype else "--type F16")


def refit_values(w: np.ndarray, hdiag: np.ndarray | None, qtype: str, note: str = "", *, f16_why: str = "--type F16",
                 undivided: str | None = None, k_seed: tuple | None = None) -> PackedTensor:
    """Float values w (rows, n) stored as `qtype`, refit on diag(H) (hdiag; None = 1); F16 when qtype's block does
    not divide n. note: the refit's report note; k_seed: a master's (bits, group_size, scale, zero) for a K type."""
    from .presets import BLOCK, EXTRA_TYPES, refit_extra

    n = w.shape[1]
    if qtype == "F32":
        return _float_tensor(w, qtype)
    if qtype == "F16":
        return _fallback_float(w, hdiag, f16_why)
    if n % BLOCK.get(qtype, QK):
        return _fallback_float(w, hdiag, undivided or f"{qtype} does not divide input dim {n}")
    if qtype in EXTRA_TYPES:
        return refit_extra(w, hdiag, qtype, note)
    if qtype in LEGACY_TYPES:
        return refit_legacy(w, hdiag, qtype, note)
    bits, group_size, scale, zero = k_seed or (8, n, None, None)
    return refit_k(w, hdiag, qtype, bits, group_size, scale, zero)


def _fallback_float(w: np.ndarray, hdiag, why: str) -> PackedTensor:
    w16 = w.astype(np.float16)
    h = np.ones(w.shape[1]) if hdiag is None else hdiag
    if np.isfinite(w16).all():
        err, rel = weighted_error(w, w16.astype(np.float32), h)
        return PackedTensor(w16, "F16", False, err, rel, f"fallback to F16 ({why})")
    w32 = w.astype(np.float32)
    err, rel = weighted_error(w, w32, h)
    return PackedTensor(w32, "F32", False, err, rel, f"fallback to F32 ({why})")


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def export_gguf(master, out, qtype: str = "Q4_1", embed_type: str = "auto", output_type: str = "auto",
                tokenizer_pre: str | None = None, name: str | None = None, overwrite: bool = False,
                log=None, preset: str | None = None, narrow: bool = False) -> ExportReport:
    """Write `master` (a MasterCheckpoint) as a GGUF file at `out`; return the per-tensor report.

    qtype: the block type of every quantized linear (Q4_1 / Q5_1 exact; K types refit).
    embed_type / output_type: token_embd / output types ('auto' = llama-quantize's choice, see
    DEFAULTS in the package docstring). tokenizer_pre overrides the detected llama.cpp pre-tokenizer.
    narrow: let a preset store a linear in a type with fewer bits than the master's codes (refit on diag(H))
    instead of refusing.
    """
    out = Path(out)
    from . import presets as _presets

    if preset is None and _presets.is_mixture(qtype):
        preset = qtype  # a llama-quantize mixture name (Q3_K_M, Q4_K_M, ...): per-tensor types
    plan = None
    if preset is not None:
        preset = _presets._check_preset(preset)
        plan = _presets.preset_plan(preset, master.config, tied=_is_tied(master))
        qtype = _presets.BASE[preset] if _presets.BASE[preset] in WEIGHT_TYPES else "Q4_1"
    if qtype not in WEIGHT_TYPES:
        raise UserError(f"--type {qtype} is not supported for GGUF; use one of {', '.join(WEIGHT_TYPES)}")
    for opt, val in (("--embed-type", embed_type), ("--output-type", output_type)):
        if val not in FLOAT_TYPES:
            raise UserError(f"{opt} {val} is not supported; use one of {', '.join(FLOAT_TYPES)}")
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    config = master.config
    arch, permute = metadata.gguf_arch(config)
    max_bits, file_type = WEIGHT_TYPES[qtype]
    too_wide = sorted({lin.bits for name, lin in master.linears.items()  # a quantized head takes the output type
                       if not isinstance(lin, GGUFLinear) and lin.bits > max_bits and name != HEAD})
    if plan is not None:
        file_type = _presets.FILE_TYPE[preset]
        too_wide = []
    if too_wide:
        raise UserError(f"the master holds {too_wide[-1]}-bit codes, which {qtype} ({max_bits}-bit) cannot store; "
                        f"choose --type {'Q4_1' if too_wide[-1] <= 4 else 'Q5_1' if too_wide[-1] <= 5 else 'Q5_1 after re-quantizing with <= 5 bits'}"
                        + (" or re-quantize with fewer bits" if too_wide[-1] <= 5 else ""))
    say = log or (lambda msg: None)

    n_blocks = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    n_embd = int(config["hidden_size"])
    tmap = gguf.get_tensor_name_map(_ARCH_ENUM[arch], n_blocks)

    tensors = dict(master.tensors)
    if "model.embed_tokens.weight" not in tensors:
        raise UserError("the master checkpoint lacks model.embed_tokens.weight; re-run quantize")
    embed = tensors.pop("model.embed_tokens.weight")
    n_vocab = int(config.get("vocab_size") or embed.shape[0])
    if embed.shape[0] != n_vocab:
        raise UserError(f"embedding rows {embed.shape[0]} != vocab_size {n_vocab}; the config does not match the weights")
    head = tensors.pop("lm_head.weight", None)
    tied = _is_tied(master)
    if head is not None and config.get("tie_word_embeddings", False):
        head = None  # tied: llama.cpp reuses token_embd
    shared = master.linears[HEAD] if master.head_shares_embedding else None  # token_embd = the quantized head

    out_t = default_output_type(n_embd) if output_type == "auto" else output_type
    if plan is not None and output_type == "auto" and "output.weight" in plan:
        out_t = plan["output.weight"][0]
    if plan is not None and embed_type == "auto":
        emb_t = plan["token_embd.weight"][0]
    elif embed_type != "auto":
        emb_t = embed_type
    elif tied:
        emb_t = out_t  # llama-quantize quantizes a tied token_embd like the output head
    else:
        emb_t = qtype if qtype in LEGACY_TYPES else "Q8_0"  # llama-quantize: the base type
    if shared is not None and plan is None and embed_type == "auto" and shared.bits <= max_bits:
        emb_t = qtype  # the head's codes fit the linears' type: the shared matrix is stored like them (exact)

    entries: list[tuple[str, PackedTensor]] = []

    def gname(hf: str) -> str:
        g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise UserError(f"tensor {hf!r} has no GGUF name for arch {arch}; the master does not match a supported architecture")
        return g

    if shared is not None:
        say(f"packing {HEAD} as token_embd ({emb_t})")
        entries.append(("token_embd.weight", _float_tensor(_np(embed), emb_t) if emb_t in ("F16", "F32")
                         else _pack_linear(shared, emb_t, None)))
    else:
        entries.append(("token_embd.weight", _float_tensor(_np(embed), emb_t)))
    for lname in sorted(master.linears, key=_layer_key):
        lin = master.linears[lname]
        if lname == HEAD and shared is not None:
            continue  # tied: llama.cpp reads the output head from token_embd
        perm = None
        if permute and lname.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            perm = rope_permutation(lin.shape[0], n_head if lname.endswith("q_proj") else n_kv)
        tname, ltype = gname(lname + ".weight"), qtype
        if lname == HEAD and plan is None and (output_type != "auto" or lin.bits > max_bits):
            ltype = out_t  # an untied quantized head: the output type when asked for or when its codes need it
        if plan is not None:
            if tname not in plan:
                raise UserError(f"preset {preset} has no rule for {tname}; export with a plain --type")
            ltype, type_bits = plan[tname]
            if not isinstance(lin, GGUFLinear) and lin.bits > type_bits and not narrow:
                raise UserError(f"preset {preset} stores {tname} as {ltype} ({type_bits}-bit) but the master holds "
                                f"{lin.bits}-bit codes for it; re-quantize with the preset's bit widths "
                                f"(converters.gguf.presets.preset_bits) or at most {type_bits} bits, or pass --allow-narrower to refit them")
        say(f"packing {lname} ({ltype})")
        entries.append((tname, _pack_typed(lin, ltype, perm) if isinstance(lin, GGUFLinear) else _pack_linear(lin, ltype, perm)))
    for k in sorted(tensors, key=_layer_key):
        if _SKIP.search(k):
            continue
        v = _np(tensors[k])
        if permute and re.search(r"self_attn\.(q|k)_proj\.(bias|weight)$", k):  # unquantized q/k weights too
            v = v[rope_permutation(v.shape[0], n_head if ".q_proj" in k else n_kv)]
        if v.ndim == 2:  # an unquantized linear weight left in the master
            entries.append((gname(k), _float_tensor(v, "F16")))
        else:
            entries.append((gname(k), PackedTensor(v.astype(np.float32), "F32", True, 0.0, 0.0, "float")))
    if head is not None:
        entries.append(("output.weight", _float_tensor(_np(head), out_t)))

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(name or _model_name(master, out))
        w.add_file_type(int(file_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_quantized_by("neuqi-export")
        q = master.quantization_config
        for key in ("bits", "group_size", "init", "gptq"):
            if key in q and isinstance(q[key], (bool, int, str)):
                val = q[key]
                if isinstance(val, bool):
                    w.add_bool(f"neuqi.{key}", val)
                elif isinstance(val, int):
                    w.add_int32(f"neuqi.{key}", val)
                else:
                    w.add_string(f"neuqi.{key}", val)
        rope_freqs = metadata.add_hparams(w, config, n_vocab)
        tok_info = metadata.add_tokenizer(w, master.tokenizer_dir, n_vocab, tokenizer_pre)
        if rope_freqs is not None:
            entries.append(("rope_freqs.weight", PackedTensor(rope_freqs, "F32", True, 0.0, 0.0, "llama3 rope factors")))
        for tname, pt in entries:
            if pt.qtype in ("F32", "F16"):
                w.add_tensor(tname, np.ascontiguousarray(pt.data))
            else:
                w.add_tensor(tname, np.ascontiguousarray(pt.data), raw_dtype=gguf.GGMLQuantizationType[pt.qtype])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    report = ExportReport(path=out, bytes=out.stat().st_size)
    for tname, pt in entries:
        report.tensors.append(TensorReport(tname, pt.qtype, pt.exact, pt.added_error, f"rel {pt.rel_error:.3g}; {pt.note}"))
    report.tokenizer = tok_info  # type: ignore[attr-defined]
    return report


def export_original(model_dir, out, qtype: str = "F16", overwrite: bool = False) -> ExportReport:
    """A HF model's own (unquantized) weights as a GGUF, every tensor `qtype` (F16/F32): llama-quantize's input."""
    from neuqi_export.modeling import float_master

    return export_gguf(float_master(model_dir), out, qtype=qtype, embed_type=qtype, output_type=qtype, overwrite=overwrite)


def _is_tied(master) -> bool:
    """The output head is token_embd: tied in the config, or no head stored (float or quantized)."""
    return bool(master.config.get("tie_word_embeddings", False)) or (
        "lm_head.weight" not in master.tensors and HEAD not in master.linears)


def _layer_key(name: str):
    m = re.search(r"layers\.(\d+)\.", name)
    return (int(m.group(1)) if m else 10**9, name)


def _model_name(master, out: Path) -> str:
    src = master.config.get("_name_or_path") or master.config.get("_model_name_or_path")
    if src:
        return Path(str(src)).name
    if master.tokenizer_dir is not None:
        return Path(master.tokenizer_dir).name
    return out.stem
