#!/usr/bin/env python3
"""A quantized output head (`quantize --lm-head-bits B`) on SmolLM2-135M -> docs/HEAD_COMPARE.md.

SmolLM2 ties its output head to the embedding (49152 x 576: 21% of the model's parameters), which every
exporter used to keep in float. With --lm-head-bits that one matrix is quantized like a linear (NeUQI + GPTQ on
the final norm's outputs) and every format stores it once, quantized: GGUF token_embd (Q4_1 exact, or Q8_0),
ONNX GatherBlockQuantized + MatMulNBits sharing one weight, MLX QuantizedEmbedding. Rows per head width
(float = today's default, 8, 4, 3 bits), the body 3- or 4-bit g128, NeUQI + GPTQ: the master in
transformers, GGUF (--type Q4_1) in llama.cpp and ONNX (fast form, accuracy_level 4) in onnxruntime on the same
held-out windows; MLX (exact, mlx-lm is slow on Linux CPUs) on the first --mlx-windows only, against the
master on those windows; the sizes of all four formats. Cells are cached as JSON under --work.

    OMP_NUM_THREADS=1 python tools/head_compare.py
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.compressed_tensors import export_compressed_tensors  # noqa: E402
from converters.gguf import export_gguf  # noqa: E402
from converters.mlx import export_mlx  # noqa: E402
from converters.onnx.export import export_onnx  # noqa: E402
from neuqi_export.assets import fetch_assets  # noqa: E402
from neuqi_export.data import eval_windows, read_text  # noqa: E402
from neuqi_export.cli.demo import _weights_size, ppl_of, score  # noqa: E402
from neuqi_export.master_store import is_master_dir  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402
from neuqi_export.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from runtimes.registry import load_all as load_runtimes  # noqa: E402
from tools.cells import Cells  # noqa: E402

FORMATS = {  # name -> (runtime, exporter, file name)
    "GGUF Q4_1": ("llamacpp", lambda m, o: export_gguf(m, o, qtype="Q4_1"), "model.gguf"),
    "ONNX": ("onnxruntime", export_onnx, "onnx"),
    "MLX": ("mlx", export_mlx, "mlx"),
    "compressed-tensors": ("transformers", export_compressed_tensors, "ct"),
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4], help="body bit widths (one table block each)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--head-bits", nargs="+", default=["float", "8", "4", "3"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=40)
    ap.add_argument("--mlx-windows", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--work", default=str(ROOT / "out" / "head_compare"))
    ap.add_argument("--output", default=str(ROOT / "docs" / "HEAD_COMPARE.md"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    command = " ".join(["OMP_NUM_THREADS=1 python tools/head_compare.py", *map(shlex.quote, sys.argv[1:])])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    assets = fetch_assets()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)
    runtimes = load_runtimes()

    def cell(key: str, runtime: str, path: Path, w) -> dict:
        def measure():
            t0 = time.time()
            r = score(runtimes[runtime], path, w, args.decode_tokens if runtime != "mlx" else 0, progress=False)
            r.update(bytes=_weights_size(path), runtime=runtime, seconds=round(time.time() - t0, 1))
            return r
        cells = Cells(work, f".e{w.shape[0]}x{w.shape[1]}", show=lambda r: {k: v for k, v in r.items() if k != "nll"})
        return cells.get(key, measure)

    rows = []
    for bits, hb in ((b, h) for b in args.bits for h in args.head_bits):
        head = None if hb == "float" else int(hb)
        key = f"b{bits}_g{args.group_size}_neuqi_gptq_n{args.nsamples}x{args.seqlen}_head{hb}"
        mdir = work / key
        if not is_master_dir(mdir):
            opts = QuantizeOptions(bits=bits, group_size=args.group_size, init="neuqi", gptq=True,
                                   nsamples=args.nsamples, seqlen=args.seqlen, lm_head_bits=head)
            s = quantize_model(assets.model_dir, mdir, opts, calib_text=read_text(assets.calib_text), force=True,
                               progress=False)
            (work / f"{key}.summary.json").write_text(json.dumps({"seconds": s.seconds, "head": s.per_layer.get("lm_head")}))
        master = MasterCheckpoint.load(mdir)
        row = {"bits": bits, "head": hb, "master": cell(f"master-{key}", "transformers", mdir, windows), "formats": {}}
        for name, (runtime, fn, fname) in FORMATS.items():
            out = work / f"{key}.{fname}"
            if not out.exists():
                rep = fn(master, out)
                (work / f"{key}.{fname}.report.json").write_text(json.dumps(
                    [[t.name, t.type, t.exact, t.added_error] for t in rep.tensors if "embd" in t.name or "embed" in t.name
                     or "head" in t.name or t.name == "output.weight"]))
            if name == "MLX":
                w = windows[: args.mlx_windows]
                row["formats"][name] = cell(f"mlx-{key}", runtime, out, w)
            elif name == "compressed-tensors":
                row["formats"][name] = {"bytes": _weights_size(out)}
            else:
                row["formats"][name] = cell(f"{fname}-{key}", runtime, out, windows)
            row["formats"][name]["report"] = json.loads((work / f"{key}.{fname}.report.json").read_text())
        rows.append(row)
    write(args, command, rows, windows)


def write(args, command, rows, windows) -> None:
    import hashlib

    import numpy as np

    n_tok = windows.shape[0] * (windows.shape[1] - 1)
    ids_sha = hashlib.sha256(windows.numpy().astype(np.int64).tobytes()).hexdigest()[:16]  # as tools/onnx_compare.py
    k = args.mlx_windows
    lines = ["# A quantized output head on SmolLM2-135M-Instruct (tied embedding)", "", f"Command: `{command}`", "",
             f"Body: {'/'.join(map(str, args.bits))}-bit g{args.group_size}, NeUQI + GPTQ, calibration {args.nsamples} × {args.seqlen} tokens "
             "of Wikipedia lead sections; `--lm-head-bits` quantizes the tied head/embedding (49152 × 576) with the same "
             f"group size, NeUQI + GPTQ on the final norm's outputs. Perplexity on {windows.shape[0]} held-out windows × "
             f"{windows.shape[1]} tokens ({n_tok:,} scored tokens, ids sha256 prefix `{ids_sha}`), the same token ids in every "
             "row, each artifact in its own runtime (GGUF `--type Q4_1`: the body's codes exact in Q4_1; ONNX: the "
             "default fast form, uint8 zero points + exact correction, accuracy_level 4 = int8 activations); MLX "
             f"(mlx-lm's Linux CPU build runs at a few tokens/s) on the first {k} window{'s' if k != 1 else ''}, next to "
             f"the master's perplexity on {'those' if k != 1 else 'that one'}. Size = weight files (MiB). Decode = {args.decode_tokens} greedy tokens "
             "after a 64-token prompt, 1 thread (OMP_NUM_THREADS=1), a 2-core machine shared with other jobs: noisy.", "",
             "| body | head | master ppl | GGUF Q4_1: MiB | ppl (llama.cpp) | token_embd | ONNX: MiB | ppl (onnxruntime) | "
             f"decode tok/s | MLX: MiB | ppl, {k} window{'s' if k != 1 else ''} (master) | compressed-tensors MiB |",
             "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, f = r["master"], r["formats"]
        g, o, x, c = f["GGUF Q4_1"], f["ONNX"], f["MLX"], f["compressed-tensors"]
        emb = next((f"{t[1]}{' exact' if t[2] else ' refit'}" for t in g["report"] if t[0] == "token_embd.weight"), "")
        head = "float (default)" if r["head"] == "float" else f"{r['head']}-bit"
        lines.append(f"| {r['bits']}-bit | {head} | {m['ppl']:.3f} | {g['bytes'] / 2**20:.1f} | {g['ppl']:.3f} | {emb} | "
                     f"{o['bytes'] / 2**20:.1f} | {o['ppl']:.3f} | {o['decode_tps']:.1f} | {x['bytes'] / 2**20:.1f} | "
                     f"{x['ppl']:.3f} ({ppl_of(m['nll'], windows.shape[1], k):.3f}) | {c['bytes'] / 2**20:.1f} |")
    lines += ["", "## Read from the table", ""]
    for r in rows:
        ref = next((x for x in rows if x["bits"] == r["bits"] and x["head"] == "float"), None)
        if ref is None or r is ref:
            continue
        size = ", ".join(f"{name.split()[0]} {100 * (r['formats'][name]['bytes'] / ref['formats'][name]['bytes'] - 1):+.0f}%"
                         for name in ("ONNX", "MLX", "GGUF Q4_1"))
        lines.append(f"- {r['bits']}-bit body, {r['head']}-bit head vs the float head: master perplexity "
                     f"{100 * (r['master']['ppl'] / ref['master']['ppl'] - 1):+.2f}% (llama.cpp "
                     f"{100 * (r['formats']['GGUF Q4_1']['ppl'] / ref['formats']['GGUF Q4_1']['ppl'] - 1):+.2f}%, "
                     f"onnxruntime {100 * (r['formats']['ONNX']['ppl'] / ref['formats']['ONNX']['ppl'] - 1):+.2f}%); "
                     f"size {size}; ONNX decode {r['formats']['ONNX']['decode_tps']:.0f} vs "
                     f"{ref['formats']['ONNX']['decode_tps']:.0f} tok/s.")
    lines += ["", "GGUF stores a float head as Q8_0 already (llama-quantize's rule for a tied token_embd whose row is not a "
              "multiple of 256), so an 8-bit head saves nothing there and its codes are refit into Q8_0 (the small loss "
              "above); a 4- or 3-bit head is written exactly as Q4_1.", "",
              "The onnxruntime-genai builder's int4 CPU model (its default for tied embeddings: embedding and lm_head one "
              "shared 4-bit matrix, RTN) is in docs/ONNX_COMPARE.md, scored on the same windows when the sha256 prefixes "
              "match.", "",
              "compressed-tensors keeps the head in float: transformers' loader leaves lm_head unquantized (its packed "
              "weights would be dropped), so the export writes the tied head's dequantized values as the embedding.", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
