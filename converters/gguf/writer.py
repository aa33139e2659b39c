"""Master checkpoint -> one GGUF file (written to a temp file beside the target, then renamed)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import gguf
import numpy as np

from converters.registry import ExportReport, TensorReport
from neuqi_export.atomic import atomic_file
from neuqi_export.errors import UserError
from neuqi_export.experts import num_experts
from neuqi_export.master import HEAD, GGUFLinear

from . import arch as _arch
from . import experts as _experts
from . import metadata, vocab
from .exact import NotRepresentable, PackedTensor, master_dequant, weighted_error
from .packers import QK
from .spill import TensorSpill
from .types import FLOAT_TYPES, SINGLE_TYPES, TYPES, fallback_type, head_type

_SKIP = re.compile(r"rotary_emb\.inv_freq$")


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
    """An unquantized master tensor (embedding / output head) stored as qtype (its row's from_float)."""
    if qtype not in TYPES:
        raise UserError(f"unknown tensor type {qtype!r}; use one of {', '.join(FLOAT_TYPES[1:])}")
    return TYPES[qtype].from_float(np.asarray(w, np.float32))


def default_output_type(n_embd: int, base: str = "Q4_1") -> str:
    """llama-quantize's rule for output.weight (and a tied token_embd) with linears of type `base`: Q6_K, or Q8_0
    when the row is not a multiple of 256 or base is Q8_0 (types.head_type)."""
    return head_type(base, n_embd)


def _pack_linear(lin, qtype: str, perm: np.ndarray | None) -> PackedTensor:
    """A master linear (codes, scale, zero) as qtype: exact when its codes fit (Q4_1/Q5_1: codes of at most their
    bits; Q8_0/Q4_0/Q5_0: integer zero-points that keep the codes in range), else refit on diag(H) with the
    reason in the note (IQ4_NL always: its values are no uniform grid)."""
    codes = lin.codes.cpu().numpy().astype(np.uint8)
    scale = lin.scale.float().cpu().numpy()
    zero = lin.zero.float().cpu().numpy()
    if perm is not None:
        codes, scale, zero = codes[perm], scale[perm], zero[perm]
    hdiag = None if lin.hdiag is None else lin.hdiag.float().cpu().numpy()
    g = lin.effective_group_size
    row = TYPES[qtype]
    if row.tries_exact:
        try:
            return row.exact(codes, scale, zero, g, lin.bits, hdiag)
        except NotRepresentable as exc:
            why = str(exc)
        return refit_values(master_dequant(codes, scale, zero, g), hdiag, qtype, why, undivided=why)
    w = master_dequant(codes, scale, zero, g)
    if not row.legacy_fallback or w.shape[1] % row.block == 0:
        return refit_values(w, hdiag, qtype, k_seed=(lin.bits, g, scale, zero))
    # like llama-quantize, a row that is not a multiple of 256 gets a legacy type: Q4_1 (exact when the
    # master fits it), else Q5_1 exact, else a Q4_1 refit
    why = f"input dim {w.shape[1]} is not a multiple of {row.block}"
    for legacy in (t for t, r in TYPES.items() if r.exact_capable):  # Q4_1, then Q5_1
        try:
            pt = TYPES[legacy].exact(codes, scale, zero, g, lin.bits, hdiag)
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
    n = lin.shape[1]
    asked = qtype
    if qtype in TYPES:  # a type whose block does not divide the row: llama-quantize's fallback type for it
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
    n = w.shape[1]
    if qtype == "F32":
        return _float_tensor(w, qtype)
    if qtype == "F16":
        return _fallback_float(w, hdiag, f16_why)
    if n % (TYPES[qtype].block if qtype in TYPES else QK):
        return _fallback_float(w, hdiag, undivided or f"{qtype} does not divide input dim {n}")
    return TYPES[qtype].refit(w, hdiag, note, seed=k_seed)


def _pack_folded(lin, qtype: str, perm, fold: float) -> PackedTensor:
    """A q projection times the query fold: the master's scales times it (codes unchanged, as exact as any
    master linear), or for a linear already in a GGUF type a refit of its scaled values."""
    if not isinstance(lin, GGUFLinear):
        pt = _pack_linear(_arch.fold_linear(lin, fold), qtype, perm)
    else:
        w = lin.dequantize().double().numpy() * fold
        hdiag = None if lin.hdiag is None else lin.hdiag.float().cpu().numpy()
        pt = refit_values(w if perm is None else w[perm], hdiag, qtype, f"refit from {lin.qtype} x{fold:.4g}")
    pt.note = f"{pt.note}; scales x{fold:.4g} (query scale)"
    return pt


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
        plan = _presets.preset_plan(preset, master.config, tied=master.head_is_embedding)
        qtype = _presets.BASE[preset] if _presets.BASE[preset] in SINGLE_TYPES else "Q4_1"
    if qtype not in SINGLE_TYPES:
        raise UserError(f"--type {qtype} is not supported for GGUF; use one of {', '.join(SINGLE_TYPES)}")
    for opt, val in (("--embed-type", embed_type), ("--output-type", output_type)):
        if val not in FLOAT_TYPES:
            raise UserError(f"{opt} {val} is not supported; use one of {', '.join(FLOAT_TYPES)}")
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    config = master.config
    fam = _arch.check(config)  # before any work: the family and what llama.cpp can run of it
    arch, permute = fam.gguf_arch, fam.gguf_permute_qk
    fold, folded = _arch.query_fold(fam, config), _arch.fold_names(fam, config)
    norms = set(fam.norm_names(config))
    max_bits, file_type = TYPES[qtype].bits, TYPES[qtype].file_type
    layouts = {name: master.layout(name) for name in master.linears}  # no linear read to tell its bits
    too_wide = sorted({m["bits"] for name, m in layouts.items()  # a quantized head takes the output type
                       if "bits" in m and m["bits"] > max_bits and name != HEAD})
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
    tmap = _arch.tensor_map(fam, n_blocks)

    embed_name, head_name = f"{fam.embed}.weight", f"{fam.head}.weight"
    if embed_name not in master.tensors:
        raise UserError(f"the master checkpoint lacks {embed_name}; re-run quantize")
    tied = master.head_is_embedding
    _arch.check_head(fam, tied)
    # the head is read at its turn (the last tensor); tied: llama.cpp reuses token_embd
    head_name = head_name if head_name in master.tensors and not config.get("tie_word_embeddings", False) else None
    shared = master.head_shares_embedding  # token_embd = the quantized head
    head_bits = master.linears[HEAD].bits if shared else None

    out_t = default_output_type(n_embd, qtype) if output_type == "auto" else output_type
    if plan is not None and output_type == "auto" and "output.weight" in plan:
        out_t = plan["output.weight"][0]
    if plan is not None and embed_type == "auto":
        emb_t = plan["token_embd.weight"][0]
    elif embed_type != "auto":
        emb_t = embed_type
    elif tied:
        emb_t = out_t  # llama-quantize quantizes a tied token_embd like the output head
    else:
        # llama-quantize: the base type (Q4_1/Q5_1/Q8_0/Q4_0/Q5_0/IQ4_NL; Q8_0 for K types and floats)
        emb_t = qtype if TYPES[qtype].embed and not TYPES[qtype].is_float else "Q8_0"
    if shared and plan is None and embed_type == "auto" and head_bits <= max_bits:
        emb_t = qtype  # the head's codes fit the linears' type: the shared matrix is stored like them (exact)

    # every packed tensor is parked in the spill as it is made (one tensor in RAM at a time); its name is one
    # sweep_stale removes when a killed export leaves it, and it is removed on success and on error
    with TensorSpill(out.parent / f".{out.name}.{os.getpid()}.spilling") as spill, atomic_file(out) as tmp:
        entries: list[tuple[str, PackedTensor]] = []

        def add(tname: str, pt: PackedTensor) -> None:
            pt.data = spill.hold(pt.data)
            entries.append((tname, pt))

        def gname(hf: str) -> str:
            g = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
            if g is None:
                raise UserError(f"tensor {hf!r} has no GGUF name for arch {arch}; the master does not match a supported architecture")
            return g

        embed = master.tensors[embed_name]
        n_vocab = int(config.get("vocab_size") or embed.shape[0])
        if embed.shape[0] != n_vocab:
            raise UserError(f"embedding rows {embed.shape[0]} != vocab_size {n_vocab}; the config does not match the weights")
        if shared:
            say(f"packing {HEAD} as token_embd ({emb_t})")
            add("token_embd.weight", _float_tensor(_np(embed), emb_t) if emb_t in ("F16", "F32")
                else _pack_linear(master.linears[HEAD], emb_t, None))
        else:
            add("token_embd.weight", _float_tensor(_np(embed), emb_t))
        del embed
        stacked: dict[str, dict[int, PackedTensor]] = {}  # MoE: {stacked HF name: {expert: its packed rows}}
        for lname in sorted(master.linears, key=_layer_key):
            if lname == HEAD and shared:
                continue  # tied: llama.cpp reads the output head from token_embd
            lin = master.linears[lname]
            perm = None
            if permute and lname.endswith(("self_attn.q_proj", "self_attn.k_proj")):
                perm = rope_permutation(lin.shape[0], n_head if lname.endswith("q_proj") else n_kv)
            ekey = _experts.expert_key(fam, lname)
            tname, ltype = gname((ekey[0] if ekey else lname) + ".weight"), qtype
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
            if lname + ".weight" in folded:  # the queries carry llama.cpp's attention-scale difference
                add(tname, _pack_folded(lin, ltype, perm, fold))
                continue
            packed = _pack_typed(lin, ltype, perm) if isinstance(lin, GGUFLinear) else _pack_linear(lin, ltype, perm)
            del lin
            if ekey:
                packed.data = spill.hold(packed.data)
                stacked.setdefault(ekey[0], {})[ekey[1]] = packed
            else:
                add(tname, packed)
        for sname, parts in stacked.items():
            def repack(e, t, sname=sname):  # one expert whose fallback differed: refit into the others' type
                lin = master.linears[f"{sname.rsplit('.', 1)[0]}.{e}.{sname.rsplit('.', 1)[1]}"]
                return refit_values(lin.dequantize().numpy(), None if lin.hdiag is None else _np(lin.hdiag), t,
                                    "as the block's other experts")
            add(gname(sname + ".weight"), _experts.stack(sname, parts, num_experts(config), repack))
        del stacked
        for k in sorted(master.tensors, key=_layer_key):
            if k in (embed_name, f"{fam.head}.weight") or _SKIP.search(k):
                continue
            v = _arch.float_tensor(fam, k, _np(master.tensors[k]), norms, folded, fold)
            if permute and re.search(r"self_attn\.(q|k)_proj\.(bias|weight)$", k):  # unquantized q/k weights too
                v = v[rope_permutation(v.shape[0], n_head if ".q_proj" in k else n_kv)]
            if v.ndim == 2:  # an unquantized linear weight left in the master (the MoE router: F32, as llama.cpp keeps it)
                add(gname(k), _float_tensor(v, "F32" if _experts.is_f32_role(gname(k)) else "F16"))
            else:
                add(gname(k), PackedTensor(v.astype(np.float32), "F32", True, 0.0, 0.0, "float"))
        if head_name is not None:
            add("output.weight", _float_tensor(_np(master.tensors[head_name]), out_t))

        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type("model")
        w.add_name(vocab.loadable_name(name or _model_name(master, out), master.tokenizer_dir, name is not None))
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
        rope_tensors = metadata.add_hparams(w, config, n_vocab, _arch.main_rope(fam, config))
        _arch.add_arch_hparams(w, fam, config)
        tok_info = vocab.add_tokenizer(w, master.tokenizer_dir, n_vocab, tokenizer_pre)
        entries += [(t, PackedTensor(v, "F32", True, 0.0, 0.0, "rope factors")) for t, v in rope_tensors.items()]
        for tname, pt in entries:
            if pt.qtype in ("F32", "F16"):
                w.add_tensor(tname, np.ascontiguousarray(pt.data))
            else:
                w.add_tensor(tname, np.ascontiguousarray(pt.data), raw_dtype=gguf.GGMLQuantizationType[pt.qtype])
            pt.data = None  # the writer holds the (mapped) array until it is written
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
