#!/usr/bin/env python3
"""Perplexity of SmolLM2-135M quantized with each init (± GPTQ) at 2/3 bits, on held-out Wikipedia.

Writes docs/CORE_RESULTS.md with the exact command. Finished cells are cached as JSON in --work,
so an interrupted run resumes.

    python tools/core_table.py --nsamples 32 --seqlen 512 --eval-seqlen 512 --eval-windows 40
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuqi_export.assets import fetch_assets  # noqa: E402
from neuqi_export.data import eval_windows, read_text  # noqa: E402
from neuqi_export.evaluate import perplexity_hf  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402
from neuqi_export.modeling import load_hf_model, master_to_hf  # noqa: E402
from neuqi_export.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from tools.cells import Cells  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--inits", nargs="+", default=["minmax", "neuqi_int", "neuqi"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work", default=str(ROOT / "out" / "core_table"))
    ap.add_argument("--output", default=str(ROOT / "docs" / "CORE_RESULTS.md"))
    args = ap.parse_args()
    command = "python tools/core_table.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    torch.set_num_threads(max(1, torch.get_num_threads()))
    assets = fetch_assets()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    calib = read_text(assets.calib_text)
    model, tok, _ = load_hf_model(assets.model_dir)
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)

    cell = Cells(work).get

    def fp16():
        t0 = time.time()
        r = perplexity_hf(model, windows, progress=False)
        return {"ppl": r.ppl, "quant_s": 0.0, "eval_s": time.time() - t0, "tokens": r.tokens}

    rows = [("unquantized (fp32)", "-", "-", cell("fp32", fp16))]
    for bits in args.bits:
        for gptq in (False, True):
            for init in args.inits:
                key = f"b{bits}_g{args.group_size}_{init}_{'gptq' if gptq else 'rtn'}_n{args.nsamples}x{args.seqlen}"

                def run(bits=bits, init=init, gptq=gptq, key=key):
                    opts = QuantizeOptions(bits=bits, group_size=args.group_size, init=init, gptq=gptq,
                                           nsamples=args.nsamples, seqlen=args.seqlen)
                    s = quantize_model(assets.model_dir, work / key, opts, calib_text=calib, device=args.device,
                                       force=True, progress=False)
                    t0 = time.time()
                    r = perplexity_hf(master_to_hf(MasterCheckpoint.load(work / key)), windows, progress=False)
                    return {"ppl": r.ppl, "quant_s": s.seconds, "eval_s": time.time() - t0, "tokens": r.tokens,
                            "hessian_loss": s.hessian_loss, "diag_loss": s.diag_loss}

                rows.append((f"{bits}-bit g{args.group_size}", init, "on" if gptq else "off", cell(key, run)))

    n_tok = rows[0][3]["tokens"]
    lines = [
        "# Core results: SmolLM2-135M-Instruct, held-out Wikipedia perplexity",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: {args.nsamples} windows × {args.seqlen} tokens of Wikipedia lead sections. "
        f"Evaluation: {windows.shape[0]} non-overlapping windows × {args.eval_seqlen} tokens of full Wikipedia "
        f"articles ({n_tok} scored tokens), evaluated with the dequantized weights in transformers (fp32). "
        f"Machine: {torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        "",
        "Caveat (DESIGN.md): the model ships as Q4_1, so its weights already sit on a 4-bit grid of 32.",
        "",
        "| setting | init | GPTQ | perplexity | summed layer loss tr(ΔW H ΔWᵀ) | quantize time (s) |",
        "|---|---|---|---:|---:|---:|",
    ]
    earlier = set()
    for setting, init, gptq, r in rows:
        loss = f"{r['hessian_loss']:.4g}" if "hessian_loss" in r else "-"
        mark = ""
        if r.get("measured"):  # a cell cached by an earlier run of this command
            earlier.add(r["measured"])
            mark = " †"
        lines.append(f"| {setting}{mark} | {init} | {gptq} | {r['ppl']:.2f} | {loss} | {r['quant_s']:.0f} |")
    for note in sorted(earlier):
        lines += ["", f"† {note}."]
    lines += ["", "Quantize times are wall-clock on a shared 2-core machine whose load varied between runs (1 to 6 "
              "runnable jobs); compare them within a run, not across. The NeUQI search itself is timed in "
              "docs/BENCH_INIT_CPU.md."]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
