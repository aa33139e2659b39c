#!/usr/bin/env python3
"""The safetensors layouts on SmolLM2-135M at 2/3/4 bits: MLX (exact float zero-point) in mlx-lm and
compressed-tensors (integer zero-point) in transformers, against the master checkpoint -> docs/SAFETENSORS_COMPARE.md.

Rows per bit width (g128, NeUQI init + GPTQ):
  master (neuqi)               the float-zero-point master, dequantized in transformers: the reference
  MLX (fp32 | fp16 | bf16 scales/biases)   export_mlx of that master, scored in mlx-lm
  compressed-tensors (refit)   export of the same float master: zero-points rounded, codes re-rounded on diag(H)
  master (neuqi_int)           a master quantized with integer zero-points
  compressed-tensors (exact)   export of the neuqi_int master, scored in transformers
Every row is scored on the same token windows (runtimes' own forward passes, neuqi_export.cli.demo.score); the
Linux CPU build of MLX is slow, so the windows are few and short by default. Masters are taken from
--masters (tools/report.py --keep-masters writes them) or quantized into --work; cells are cached as JSON.

    OMP_NUM_THREADS=1 python tools/safetensors_compare.py --masters out/report/masters --nsamples 16
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.compressed_tensors import export_compressed_tensors  # noqa: E402
from converters.mlx import export_mlx  # noqa: E402
from neuqi_export.assets import fetch_assets  # noqa: E402
from neuqi_export.data import eval_windows, read_text  # noqa: E402
from neuqi_export.cli.demo import _weights_size, score  # noqa: E402
from neuqi_export.master_store import is_master_dir  # noqa: E402
from neuqi_export.master import MasterCheckpoint  # noqa: E402
from neuqi_export.pipeline import QuantizeOptions, quantize_model  # noqa: E402
from runtimes.registry import load_all as load_runtimes  # noqa: E402
from tools.cells import Cells  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--dtype-bits", type=int, nargs="*", default=[3], help="widths that also get fp16/bf16 MLX rows")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--masters", default=str(ROOT / "out" / "report" / "masters"))
    ap.add_argument("--work", default=str(ROOT / "out" / "safetensors_compare"))
    ap.add_argument("--output", default=str(ROOT / "docs" / "SAFETENSORS_COMPARE.md"))
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    command = "OMP_NUM_THREADS=1 python tools/safetensors_compare.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    work, masters = Path(args.work), Path(args.masters)
    work.mkdir(parents=True, exist_ok=True)
    assets = fetch_assets()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(assets.model_dir))
    windows = eval_windows(tok, read_text(assets.eval_text), args.eval_seqlen, max_windows=args.eval_windows)
    runtimes = load_runtimes()
    gtag = f"g{args.group_size}" if args.group_size > 0 else "gpc"

    def master(bits: int, init: str) -> Path:
        key = f"b{bits}_{gtag}_{init}_gptq_n{args.nsamples}x{args.seqlen}"
        for p in (masters / key, work / key):
            if is_master_dir(p):
                return p
        opts = QuantizeOptions(bits=bits, group_size=args.group_size, init=init, gptq=True, nsamples=args.nsamples,
                               seqlen=args.seqlen)
        quantize_model(assets.model_dir, work / key, opts, calib_text=read_text(assets.calib_text), force=True,
                       progress=False)
        return work / key

    cells = Cells(work, f".e{windows.shape[0]}x{windows.shape[1]}",
                  show=lambda r: {k: v for k, v in r.items() if k != "nll"})

    def cell(key: str, runtime: str, make) -> dict:
        def measure():
            path, extra = make()
            t0 = time.time()
            r = score(runtimes[runtime], path, windows, args.decode_tokens, progress=False)
            r.update(extra, bytes=_weights_size(path), runtime=runtime, seconds=round(time.time() - t0, 1))
            return r
        return cells.get(key, measure)

    def exported(key: str, fn, src: Path):
        out = work / key
        extra = {}
        if not out.exists():
            rep = fn(MasterCheckpoint.load(src), out)
            refit = [t for t in rep.tensors if not t.exact]
            extra = {"exact": len(rep.tensors) - len(refit), "refit": len(refit)}
        return out, extra

    rows = []
    for b in args.bits:
        mf = master(b, "neuqi")
        rows.append((b, "master (neuqi, float zero-point)", cell(f"master-{mf.name}", "transformers", lambda: (mf, {}))))
        for dt in ["fp32"] + (["fp16", "bf16"] if b in args.dtype_bits else []):
            key = f"mlx-{dt}-{mf.name}"
            rows.append((b, f"MLX, {dt} scales/biases", cell(key, "mlx", lambda key=key, dt=dt: exported(
                key, lambda m, o: export_mlx(m, o, scale_dtype=dt), mf))))
        key = f"ct-{mf.name}"
        rows.append((b, "compressed-tensors from the neuqi master (zero-points rounded, codes refit)",
                     cell(key, "transformers", lambda key=key: exported(key, export_compressed_tensors, mf))))
        mi = master(b, "neuqi_int")  # after the float rows: another run may still be writing it
        rows.append((b, "master (neuqi_int, integer zero-point)", cell(f"master-{mi.name}", "transformers",
                                                                      lambda: (mi, {}))))
        key = f"ct-{mi.name}"
        rows.append((b, "compressed-tensors from the neuqi_int master",
                     cell(key, "transformers", lambda key=key: exported(key, export_compressed_tensors, mi))))
    write(args, command, rows, windows)


def write(args, command, rows, windows) -> None:
    n_tok = windows.shape[0] * (windows.shape[1] - 1)
    lines = ["# MLX and compressed-tensors exports of SmolLM2-135M-Instruct", "", f"Command: `{command}`", "",
             f"Masters: NeUQI (float zero-point) or neuqi_int (integer zero-point) init + GPTQ, g{args.group_size}, "
             f"calibration {args.nsamples} × {args.seqlen} tokens of Wikipedia lead sections. Perplexity on "
             f"{windows.shape[0]} held-out windows × {windows.shape[1]} tokens ({n_tok:,} scored tokens; few because "
             "MLX's Linux CPU build runs at a few tokens/s), the same token ids in every row, each artifact in its own "
             "runtime: MLX in mlx-lm (mlx[cpu]), compressed-tensors and masters in transformers (fp32). Size = weight "
             f"files. Decode = {args.decode_tokens} greedy tokens after a 64-token prompt through the runtime's KV cache; "
             "1 thread (OMP_NUM_THREADS=1), a 2-core machine shared with other jobs.", "",
             "| bits | artifact | runtime | size (MiB) | ppl | Δ vs its master | prefill tok/s | decode tok/s | tensors |",
             "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    ref = None
    for b, name, r in sorted(rows, key=lambda row: row[0]):  # stable: a master stays before its exports
        if name.startswith("master"):
            ref = r["ppl"]
        delta = "-" if name.startswith("master") else f"{100 * (r['ppl'] / ref - 1):+.3f}%"
        tensors = f"{r['exact']} exact, {r['refit']} refit" if "exact" in r else ""
        lines.append(f"| {b} | {name} | {r['runtime']} | {r['bytes'] / 2**20:.1f} | {r['ppl']:.3f} | {delta} | "
                     f"{r['score_tps']:.0f} | {r['decode_tps']:.1f} | {tensors} |")
    lines += ["", "Δ of a compressed-tensors row from the neuqi master is the added error of the integer-zero-point "
              "format over the float one; the neuqi_int rows show what quantizing with integer zero-points from the start "
              "costs instead (the export is then exact).", ""]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
