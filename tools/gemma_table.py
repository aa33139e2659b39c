#!/usr/bin/env python3
"""Gemma-3-270M (fetched from PyPI) in every format: held-out Wikipedia perplexity of the unquantized model, and at
each bit width (g128) and init (minmax, NeUQI; GPTQ on) of the master and of each export run in its own runtime,
with the weight files' size -> the Gemma section of docs/ARCHITECTURES.md (between `<!-- gemma-table:begin -->` and
`<!-- gemma-table:end -->`; the other sections are kept).

    python tools/gemma_table.py [--bits 3 4] [--inits minmax neuqi] [--formats gguf onnx ...] [--nsamples 32]
                                [--seqlen 512] [--eval-seqlen 512] [--eval-windows 8] [--work DIR]

Every export uses its exporter's default options (what `neuqi-export export` writes); a format that refuses the
model is a row with its refusal line. Every row is scored on the same token windows (neuqi_export.cli.demo.score, the
runtime's own forward pass). Masters and cells are cached under --work (tools/cells.py), so a rerun is cheap.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

BEGIN, END = "<!-- gemma-table:begin -->", "<!-- gemma-table:end -->"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--inits", nargs="+", default=["minmax", "neuqi"])
    ap.add_argument("--no-gptq", action="store_true", help="round to nearest after the init (rows marked 'RTN')")
    ap.add_argument("--formats", nargs="*", default=None, help="default: every registered exporter")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--work", default="/tmp/gemma_table")
    ap.add_argument("--out", default=str(ROOT / "docs" / "ARCHITECTURES.md"))
    return ap.parse_args(argv)


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def scored(runtime_name: str, path: Path, windows) -> dict:
    """Perplexity of `path` in the runtime `runtime_name` (or the one that detects it) on `windows`, and its size."""
    from neuqi_export.cli.demo import _weights_size, score
    from runtimes.registry import load_all, runtime_for

    rt = load_all().get(runtime_name) if runtime_name else runtime_for(path)
    if rt is None:
        raise RuntimeError(f"no runtime loads {path}")
    t0 = time.time()
    s = score(rt, path, windows, decode_tokens=0, progress=False)
    return {"runtime": rt.name, "ppl": s["ppl"], "windows": s["windows"], "bytes": _weights_size(path),
            "seconds": round(time.time() - t0, 1)}


def master_cell(model_dir: Path, master_dir: Path, init: str, bits: int, args, calib: str, windows) -> dict:
    """Quantize (unless done) and score the master dequantized in transformers."""
    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    t0 = time.time()
    if not (master_dir / "config.json").is_file():  # an interrupted quantize resumes from its last block
        qopts = QuantizeOptions(bits=bits, group_size=args.group_size, init=init, gptq=not args.no_gptq,
                                nsamples=args.nsamples, seqlen=args.seqlen)
        quantize_model(model_dir, master_dir, qopts, calib_text=calib, progress=False)
    q_s = time.time() - t0
    res = scored("transformers", master_dir, windows)
    return {**res, "quantize_seconds": round(q_s, 1)}


def export_cell(master_dir: Path, fmt: str, work: Path, windows) -> dict:
    """Export with the CLI's default options for `fmt` and score it in its runtime; a refusal is returned as such."""
    from converters.registry import load_all
    from neuqi_export.errors import UserError

    out = work / f"{master_dir.name}.{fmt}"
    try:
        report = load_all()[fmt].export(master_dir, out, overwrite=True)
    except UserError as exc:
        return {"refused": first_line(exc)}
    refit = sum(not t.exact for t in report.tensors)
    res = scored(None, Path(report.path), windows)
    return {**res, "tensors_exact": len(report.tensors) - refit, "tensors_refit": refit}


def main(argv=None) -> None:
    from cells import Cells
    from transformers import AutoTokenizer

    from converters.registry import load_all
    from neuqi_export.assets import fetch_assets
    from neuqi_export.data import eval_windows, read_text
    from neuqi_export.gemma_asset import fetch_gemma

    args = parse_args(argv)
    command = "python tools/gemma_table.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, assets = fetch_gemma(), fetch_assets()
    formats = args.formats if args.formats is not None else sorted(load_all())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)
    calib = read_text(assets.calib_text)
    tag = f"e{args.eval_windows}x{args.eval_seqlen}"
    cells = Cells(work / "cells")
    rows = [dict(what="unquantized (fp32)", bits="—", init="—",
                 **cells.get(f"fp-{tag}", lambda: scored("transformers", model_dir, windows)))]
    for bits in args.bits:
        for init in args.inits:
            mname = f"{init}-{bits}bit-g{args.group_size}-c{args.nsamples}x{args.seqlen}" + ("-rtn" if args.no_gptq else "")
            mdir = work / mname
            key = f"{mname}-{tag}"
            label = f"{init} (RTN)" if args.no_gptq else init
            rows.append(dict(what="master", bits=bits, init=label,
                             **cells.get(f"{key}-master", lambda: master_cell(model_dir, mdir, init, bits, args, calib,
                                                                               windows))))
            for fmt in formats:
                try:
                    res = cells.get(f"{key}-{fmt}", lambda f=fmt: export_cell(mdir, f, work, windows))
                except Exception as exc:  # one format failing must not hide the others (not cached: rerun retries)
                    res = {"error": f"{type(exc).__name__}: {first_line(exc)}"}
                    print(key, fmt, res["error"], flush=True)
                rows.append(dict(what=fmt, bits=bits, init=label, **res))
    write_section(rows, Path(args.out), command, args)


def write_section(rows: list[dict], out: Path, command: str, args) -> None:
    """The Gemma-3-270M table as the gemma-table section of `out` (other sections kept)."""
    lines = [BEGIN, "## Gemma-3-270M: perplexity in every format", "", f"`{command}`", "",
             f"Gemma-3-270M base (`neuqi-export fetch --model gemma3-270m`; Gemma Terms of Use; its weights went through "
             f"Q4_K_M before we see them). Calibration: {args.nsamples} windows × {args.seqlen} tokens of the fetched "
             f"Wikipedia lead sections; {'round-to-nearest (no GPTQ)' if args.no_gptq else 'GPTQ'} on every quantized "
             f"row; group size {args.group_size}. Perplexity on "
             f"{args.eval_windows} windows × {args.eval_seqlen} tokens of the held-out Wikipedia articles, every row "
             "on the same token ids, each in its own runtime; exports with their exporter's default options. Size: "
             "the weight files.", "",
             "| bits | init | model / format | runtime | perplexity | size (MiB) | tensors exact / refit | note |",
             "|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        head = f"| {r['bits']} | {r['init']} | {r['what']} |"
        if "refused" in r:
            lines.append(f"{head} — | — | — | — | refused: {r['refused']} |")
        elif "error" in r:
            lines.append(f"{head} — | — | — | — | failed: {r['error'][:200]} |")
        else:
            te = f"{r['tensors_exact']} / {r['tensors_refit']}" if "tensors_exact" in r else ""
            note = f"quantize {r['quantize_seconds']:.0f} s" if r.get("quantize_seconds") else ""
            lines.append(f"{head} {r['runtime']} | {r['ppl']:.2f} | {r['bytes'] / 2**20:.1f} | {te} | {note} |")
    lines.append(END)
    section = "\n".join(lines) + "\n"
    text = out.read_text() if out.is_file() else "# Architectures\n\n"
    if BEGIN in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END + "\n", 1)[-1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    out.write_text(text)
    print(section)


if __name__ == "__main__":
    main()
