#!/usr/bin/env python3
"""The quality matrix on SmolLM2-135M: init × GPTQ × distillation × bits (g128, and per-channel) -> docs/RESULTS.md.

Every cell is quantized (and, for the distilled cells, distilled from that cell's master against the
original model), scored by perplexity on held-out Wikipedia with the dequantized weights in
transformers, and cached as JSON in --work; an interrupted run resumes at the first unfinished cell
(a half-done quantization or distillation also resumes from its own .partial directory).

    python tools/report.py                       # the full matrix (many hours on 2 CPU cores)
    python tools/report.py --bits 2 --inits minmax neuqi --per-channel-bits --nsamples 4 --seqlen 128 \\
        --eval-windows 4 --distill-nsamples 4 --distill-seqlen 128 --work out/report_smoke --output out/report_smoke/RESULTS.md
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuqi_export.assets import fetch_assets  # noqa: E402
from neuqi_export.data import eval_windows, read_text  # noqa: E402
from neuqi_export.distill import DistillOptions, distill  # noqa: E402
from neuqi_export.evaluate import perplexity_hf  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402
from neuqi_export.modeling import load_hf_model, master_to_hf  # noqa: E402
from neuqi_export.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from tools.cells import Cells  # noqa: E402

INIT_COLORS = {"minmax": "tab:red", "mse": "tab:orange", "neuqi_int": "tab:blue", "neuqi": "tab:green"}


def bits_per_weight(master: MasterCheckpoint) -> float:
    """Bits per quantized linear weight: the codes plus an fp16 scale and fp16 zero-point per group."""
    n = sum(lin.codes.numel() for lin in master.linears.values())
    return sum(lin.codes.numel() * lin.bits + 32 * lin.scale.numel() for lin in master.linears.values()) / n


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the fetched SmolLM2-135M-Instruct)")
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 3, 4], help="bit widths at --group-size")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--per-channel-bits", type=int, nargs="*", default=[3, 4], help="bit widths per-channel (none: skip)")
    ap.add_argument("--inits", nargs="+", default=["minmax", "neuqi_int", "neuqi"])
    ap.add_argument("--gptq", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--distill", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window length")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--distill-bits", type=int, nargs="*", default=None,
                    help="distil only the g128 cells at these widths (default: every cell); the others show '-'")
    ap.add_argument("--distill-rtn", choices=["yes", "no"], default="yes",
                    help="'no': distil only the GPTQ cells (the paper distils after GPTQ)")
    ap.add_argument("--distill-nsamples", type=int, default=64)
    ap.add_argument("--distill-seqlen", type=int, default=512)
    ap.add_argument("--distill-steps", type=int, default=None, help="default: one epoch")
    ap.add_argument("--distill-lr", type=float, default=3e-4)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=str(ROOT / "out" / "report"), help="cell cache and intermediate masters")
    ap.add_argument("--output", default=str(ROOT / "docs" / "RESULTS.md"))
    ap.add_argument("--write-only", action="store_true",
                    help="only rewrite --output from the cached cells (missing cells show '-'), e.g. while a run goes on")
    ap.add_argument("--keep-masters", action="store_true", help="keep every master (default: deleted once its cells are done)")
    return ap.parse_args()


def plan(args) -> list[dict]:
    """Every cell of the matrix, in run order (a quantized master right before its distilled twin)."""
    cells = []
    settings = [(b, args.group_size) for b in args.bits] + [(b, -1) for b in args.per_channel_bits]
    for bits, gs in settings:
        for init in args.inits:
            for gptq in args.gptq:
                qkey = f"b{bits}_g{gs if gs > 0 else 'pc'}_{init}_{'gptq' if gptq == 'on' else 'rtn'}_n{args.nsamples}x{args.seqlen}"
                for d in args.distill:
                    if d == "on" and ((args.distill_bits is not None and (gs == -1 or bits not in args.distill_bits))
                                      or (gptq == "off" and args.distill_rtn == "no")):
                        continue
                    dkey = (f"_d{args.distill_nsamples}x{args.distill_seqlen}s{args.distill_steps or 'ep'}lr{args.distill_lr:g}"
                            if d == "on" else "")
                    cells.append(dict(bits=bits, group_size=gs, init=init, gptq=gptq == "on", distill=d == "on", qkey=qkey,
                                      key=f"{qkey}{dkey}_e{args.eval_windows}x{args.eval_seqlen}"))
    return cells


def main() -> None:
    args = parse_args()
    command = "python tools/report.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    work = Path(args.work)
    (work / "cells").mkdir(parents=True, exist_ok=True)
    masters = work / "masters"
    assets = fetch_assets()
    model_dir = Path(args.model) if args.model else assets.model_dir
    calib = read_text(assets.calib_text)
    model, tok, _ = load_hf_model(model_dir)
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)

    cells_cache = Cells(work / "cells", show=lambda res: {k: round(v, 3) if isinstance(v, float) else v
                                                          for k, v in res.items()})

    def cached(key: str, fn) -> dict | None:  # --write-only: a missing cell stays missing (None)
        return cells_cache.get(key, None if args.write_only else fn)

    def ppl_of(path: Path) -> tuple[float, float]:
        t0 = time.time()
        r = perplexity_hf(master_to_hf(MasterCheckpoint.load(path)), windows, progress=False)
        return r.ppl, time.time() - t0

    def ensure_master(c) -> tuple[Path, float]:
        path = masters / c["qkey"]
        timing = path.parent / f"{c['qkey']}.seconds"
        if not path.exists():
            opts = QuantizeOptions(bits=c["bits"], group_size=c["group_size"], init=c["init"], gptq=c["gptq"],
                                   nsamples=args.nsamples, seqlen=args.seqlen)
            s = quantize_model(model_dir, path, opts, calib_text=calib, device=args.device, force=True, progress=False)
            timing.write_text(str(s.seconds))
        return path, float(timing.read_text()) if timing.exists() else float("nan")

    def run(c) -> dict:
        mpath, qsec = ensure_master(c)
        res = {"quant_s": qsec, "bits_per_weight": bits_per_weight(MasterCheckpoint.load(mpath))}
        src = mpath
        if c["distill"]:
            dpath = work / "distilled" / c["key"]
            opts = DistillOptions(nsamples=args.distill_nsamples, seqlen=args.distill_seqlen, steps=args.distill_steps,
                                  lr=args.distill_lr)
            s = distill(mpath, model_dir, calib, dpath, opts, device=args.device, force=True, progress=False,
                        targets_dir=work / "teacher")  # one set of teacher targets for every cell
            res.update(distill_s=s.seconds, distill_first_loss=s.first_loss, distill_last_loss=s.last_loss)
            src = dpath
        res["ppl"], res["eval_s"] = ppl_of(src)
        res["tokens"] = int(windows.shape[0] * (windows.shape[1] - 1))
        if c["distill"]:
            shutil.rmtree(src, ignore_errors=True)
        return res

    fp32 = cached(f"fp32_e{args.eval_windows}x{args.eval_seqlen}",
                  lambda: {"ppl": perplexity_hf(model, windows, progress=False).ppl})
    cells = plan(args)
    results = {}
    for i, c in enumerate(cells):
        res = cached(c["key"], lambda c=c: run(c))
        if res is None:  # --write-only and not measured yet
            continue
        results[c["key"]] = res
        later = [d for d in cells[i + 1:] if d["qkey"] == c["qkey"] and not cells_cache.path(d["key"]).exists()]
        if not later and not args.keep_masters:
            shutil.rmtree(masters / c["qkey"], ignore_errors=True)
    write_markdown(args, command, cells, results, fp32, windows)


def _label(c) -> str:
    return f"{c['init']}{' + GPTQ' if c['gptq'] else ''}{' + distill' if c['distill'] else ''}"


def write_plot(args, cells, results, fp32, path: Path) -> None:
    """Perplexity vs bits per weight, one line per method; solid = g128, dotted = per-channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    lines: dict = {}
    for c in [c for c in cells if c["key"] in results]:
        lines.setdefault((_label(c), c["group_size"]), []).append((results[c["key"]]["bits_per_weight"],
                                                                    results[c["key"]]["ppl"], c))
    for (label, gs), pts in lines.items():
        pts.sort(key=lambda p: p[0])
        c = pts[0][2]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=INIT_COLORS.get(c["init"], "k"),
                linestyle=(":" if gs == -1 else ("-" if c["gptq"] else "--")), marker="o" if c["distill"] else "x",
                markersize=6, linewidth=2.6 if c["distill"] else 1.3, label=f"{label} ({'per-channel' if gs == -1 else f'g{gs}'})")
    ax.axhline(fp32["ppl"], color="grey", linewidth=1, label=f"unquantized fp32 ({fp32['ppl']:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes + fp16 scale + fp16 zero per group)")
    ax.set_ylabel("perplexity, held-out Wikipedia (log scale)")
    ax.set_title(f"{Path(args.model).name if args.model else 'SmolLM2-135M-Instruct'}: colour = init, "
                 "dashed = RTN, solid = GPTQ, dotted = per-channel; thick with o = distilled", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(args, command, cells, results, fp32, windows) -> None:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    write_plot(args, cells, results, fp32, png)
    cols = [(g, d) for g in (False, True) for d in (False, True)
            if ("on" if g else "off") in args.gptq and ("on" if d else "off") in args.distill]
    head = " | ".join(f"{'GPTQ' if g else 'RTN'}{' + distill' if d else ''}" for g, d in cols)
    lines = [
        "# Quality matrix: SmolLM2-135M-Instruct, held-out Wikipedia perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: {args.nsamples} windows × {args.seqlen} tokens of Wikipedia lead sections. Distillation "
        f"(NEUQI.md): {args.distill_nsamples} windows × {args.distill_seqlen} tokens of the same text, "
        f"{args.distill_steps or 'one epoch of'} steps, AdamW lr {args.distill_lr:g}, β (0.9, 0.95), cosine, 10% warm-up. "
        f"Evaluation: {windows.shape[0]} windows × {windows.shape[1]} tokens of full Wikipedia articles "
        f"({windows.shape[0] * (windows.shape[1] - 1):,} scored tokens), dequantized weights in transformers (fp32). "
        f"Unquantized fp32: **{fp32['ppl']:.2f}**. Machine: torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "Caveat (DESIGN.md): the model ships as Q4_1 (4-bit grid of 32), so 4-bit results flatter every method.",
        "",
        f"| setting | bits/weight | init | {head} |",
        "|---|---:|---|" + "---:|" * len(cols),
    ]
    seen = set()
    for c in cells:
        row = (c["bits"], c["group_size"], c["init"])
        if row in seen:
            continue
        seen.add(row)
        vals = []
        for g, d in cols:
            m = [x for x in cells if (x["bits"], x["group_size"], x["init"], x["gptq"], x["distill"]) == (*row, g, d)]
            vals.append(f"{results[m[0]['key']]['ppl']:.2f}" if m and m[0]["key"] in results else "-")
        if c["key"] not in results and all(v == "-" for v in vals):
            continue
        bpw = next((results[x["key"]]["bits_per_weight"] for x in cells if x["key"] in results
                    and (x["bits"], x["group_size"]) == row[:2]), float("nan"))
        setting = f"{c['bits']}-bit {'per-channel' if c['group_size'] == -1 else 'g' + str(c['group_size'])}"
        lines.append(f"| {setting} | {bpw:.2f} | {c['init']} | " + " | ".join(vals) + " |")
    if args.distill_bits is not None or args.distill_rtn == "no":
        lines += ["", "'-' under a distill column: not in this run's plan (--distill-bits "
                  f"{' '.join(map(str, args.distill_bits or [])) or 'none'}, --distill-rtn {args.distill_rtn})."]
    if len(results) < len(cells):
        lines += ["", f"**Partial**: {len(results)} of the {len(cells)} planned cells are measured; '-' = not measured yet "
                  "(the same command without --write-only resumes and fills them)."]
    q = [r["quant_s"] for r in results.values() if r["quant_s"] == r["quant_s"]]  # nan: master made elsewhere
    d = [r["distill_s"] for r in results.values() if "distill_s" in r]
    lines += ["", f"Time per cell (wall, 1 thread, shared machine; a master resumed after an interruption counts only "
              f"the resumed part, one made by another tool shows no time): quantization {min(q):.0f}–{max(q):.0f} s"
              + (f", distillation {min(d):.0f}–{max(d):.0f} s" if d else "") + ".", "",
              f"![perplexity vs bits per weight]({png.name})", ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
