#!/usr/bin/env python
"""Sizes and perplexities per format before and after issue 24 (half-precision float storage, the per-format
head default, compressed-tensors exact by default) on SmolLM2-135M and Gemma-3-270M -> docs/SIZES.md.

Masters (3-bit g128 NeUQI + GPTQ, the demo's calibration: 16 x 512 tokens), made beforehand with
`neuqi-export quantize MODEL -o DIR --bits 3 --group-size 128 --gptq --nsamples 16 --seqlen 512 ...`:
  h0  `--init neuqi` (float head)      h8  `--init neuqi --lm-head-bits 8`      int  `--init neuqi_int`
Every export is written with the CLI's own options (`neuqi-export export MASTER --to FMT ...`) and scored in its
runtime (what `neuqi-export eval` uses) on the same windows; MLX (mlx-lm's Linux CPU build is slow) on the first
--mlx-windows only, next to the master on those. Results are cached per row in --work/results-MODEL.json (rerun to add
rows; --redo to start over).

    python tools/format_sizes.py --model smollm2 --masters out/sizes/smollm2-{h0,h8r,int} [--windows 8]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (row key, master, format, CLI export options, what it shows)
ROWS = [  # in the order they are run (the head decision and the before/after rows first)
    ("onnx h0 half", "h0", "onnx", [], "float weights half (default since 24)"),
    ("onnx h8 half", "h8", "onnx", [], "+ 8-bit head"),
    ("mlx h0 half", "h0", "mlx", [], "all half (default since 24)"),
    ("mlx h0 half mlx-lm", "h0", "mlx", [], "the same file in mlx-lm itself (first window)"),
    ("mlx h8 half", "h8", "mlx", [], "+ 8-bit head"),
    ("mlx h8 half mlx-lm", "h8", "mlx", [], "+ 8-bit head, in mlx-lm itself (first window)"),
    ("ct int half", "int", "compressed-tensors", [], "after: neuqi_int master (convert's default): linears exact"),
    ("ct int exact", "int", "compressed-tensors", ["--float-storage", "exact"], "neuqi_int master, every tensor exact"),
    ("ct h0 fp32", "h0", "compressed-tensors", ["--float-storage", "fp32"], "before: float-Z master refit, fp32 floats"),
    ("onnx h0 fp32", "h0", "onnx", ["--float-storage", "fp32"], "before: float weights fp32"),
    ("mlx h0 fp32", "h0", "mlx", ["--float-storage", "fp32"], "before: fp32 floats and scales/biases"),
    ("gguf h0", "h0", "gguf", [], "default type"),
    ("gguf h8", "h8", "gguf", [], "+ 8-bit head"),
    ("mlx h0 exact", "h0", "mlx", ["--float-storage", "exact"], "floats half where lossless, scales fp32"),
    ("ct h0 half", "h0", "compressed-tensors", [], "float-Z master refit, floats in the model dtype"),
    ("mlx h0 half fp16-scales", "h0", "mlx", ["--mlx-scale-dtype", "fp16"], "floats half, scales/biases fp16"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="label (smollm2, gemma3-270m)")
    ap.add_argument("--masters", nargs=3, required=True, metavar=("H0", "H8", "INT"))
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--mlx-windows", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rows", nargs="*", default=None, help="only these row keys")
    ap.add_argument("--work", default="out/sizes")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--mlx-values", action="store_true",
                    help="score MLX rows as the file's own values (unpacked here) in transformers, on every window")
    ap.add_argument("--doc", default=None, help="write this markdown file from the cached results and stop")
    args = ap.parse_args()
    if args.doc:
        results = {}
        for f in sorted(Path(args.work).glob("results-*.json")):
            results.update(json.loads(f.read_text()))
        Path(args.doc).write_text(render(results))
        print(f"wrote {args.doc}")
        return 0

    from converters.registry import load_all as exporters
    from neuqi_export.cli import build_parser
    from neuqi_export.cli.commands import _text_path
    from neuqi_export.data import eval_windows, read_text
    from neuqi_export.cli.demo import _n_params, _weights_size, score
    from neuqi_export.master import MasterCheckpoint
    from neuqi_export.modeling import load_tokenizer
    from runtimes.registry import load_all as runtimes, runtime_for

    work = Path(args.work)
    store = work / f"results-{args.model}.json"  # one file per model: two models may be scored at once
    results = {} if args.redo or not store.is_file() else json.loads(store.read_text())
    res = results.setdefault(args.model, {})
    masters = dict(zip(("h0", "h8", "int"), map(Path, args.masters)))
    tok = load_tokenizer(masters["h0"])
    windows = eval_windows(tok, read_text(_text_path("auto", "eval")), args.seqlen, max_windows=args.windows)
    import hashlib

    res["windows"] = {"n": int(windows.shape[0]), "seqlen": args.seqlen, "mlx": args.mlx_windows,
                      "sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]}
    rts = runtimes()

    def save():
        store.write_text(json.dumps(results, indent=1))

    for tag, mdir in masters.items():
        key = f"master {tag}"
        if key not in res and (mdir / "config.json").is_file():
            print(f"{args.model}: scoring {key}", flush=True)
            m = MasterCheckpoint.load(mdir)
            r = score(rts["transformers"], mdir, windows, 0, False)
            res[key] = {"ppl": r["ppl"], "nll": r["nll"], "n_params": _n_params(m), "bytes": _weights_size(mdir)}
            save()
    for key, tag, fmt, opts, what in ROWS:
        if key in res or (args.rows and key not in args.rows) or f"master {tag}" not in res:
            continue
        path = work / f"{args.model}-x" / (key.replace(" ", "-") + (".gguf" if fmt == "gguf" else ""))
        path.parent.mkdir(parents=True, exist_ok=True)
        print(f"{args.model}: {key}: export {fmt} {' '.join(opts)}", flush=True)
        t0 = time.time()
        cli = ["export", str(masters[tag]), "--to", fmt, "-o", str(path), "--force", *opts]
        master = MasterCheckpoint.load(masters[tag])
        exporter = exporters()[fmt]
        rep = exporter.export(master, path, **exporter.options(build_parser().parse_args(cli)))
        not_exact = [t for t in rep.tensors if not t.exact]
        rt = runtime_for(path)
        if fmt == "mlx" and args.mlx_values and not key.endswith("mlx-lm"):  # the file's values in transformers on every window (module doc)
            r = score(_MlxValues(path, master), path, windows, 0, False)
            rt = _MlxValues
        else:
            w = windows[: args.mlx_windows] if fmt == "mlx" else windows
            r = score(rt, path, w, 0, False)
        res[key] = {"ppl": r["ppl"], "nll": r["nll"], "windows": r["windows"], "runtime": rt.name,
                    "bytes": _weights_size(path), "tensors": len(rep.tensors), "not_exact": len(not_exact),
                    "max_added": max((t.added_error for t in not_exact), default=0.0), "advice": rep.advice,
                    "command": "neuqi-export " + " ".join(cli[:1] + [f"MASTER-{tag}"] + cli[2:3] + [fmt] + cli[4:5]
                                                          + ["OUT"] + opts),
                    "what": what, "seconds": time.time() - t0}
        print(f"  {res[key]['bytes'] / 2**20:.1f} MiB, ppl {r['ppl']:.3f} on {r['windows']} windows "
              f"({len(not_exact)} tensors not exact) [{time.time() - t0:.0f} s]", flush=True)
        save()
    return 0


class _MlxValues:
    """A runtime-like scorer for an MLX directory: its stored values (codes unpacked with converters.mlx.unpack_mlx,
    scales * q + biases, float weights as stored) loaded into the transformers model of the master's config, in
    float32: what mlx-lm on the CPU computes (runtimes/mlx casts the stored values to fp32), at torch's speed.
    Not for families whose MLX export rescales norms (Gemma 3: compensate_embed_scale)."""

    name = "transformers (MLX file's values)"

    def __init__(self, path, master):
        self.path, self.master = Path(path), master

    def load(self, path, **_):
        import numpy as np
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        from converters.mlx import unpack_mlx
        from runtimes.transformers import TransformersScorer

        quant = json.loads((self.path / "config.json").read_text())["quantization"]
        sd = {}
        with safe_open(str(self.path / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            for k in keys:
                if k.endswith((".scales", ".biases")):
                    continue
                t, mod = f.get_tensor(k), k[: -len(".weight")]
                if f"{mod}.scales" in keys:
                    q = quant.get(mod, quant)
                    codes = torch.from_numpy(unpack_mlx(t.numpy(), q["bits"], t.shape[-1] * 32 // q["bits"]).astype(np.int64))
                    s = f.get_tensor(f"{mod}.scales").float().repeat_interleave(q["group_size"], -1)
                    b = f.get_tensor(f"{mod}.biases").float().repeat_interleave(q["group_size"], -1)
                    sd[k] = s * codes.float() + b
                else:
                    sd[k] = t.float()
        cfg = {k: v for k, v in self.master.config.items() if k not in ("quantization_config", "torch_dtype", "dtype")}
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise RuntimeError(f"MLX values do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if missing:
            model.tie_weights()
        sc = TransformersScorer.__new__(TransformersScorer)
        sc.torch, sc.device, sc.model, sc.kind = torch, torch.device("cpu"), model.eval(), "mlx-values"
        sc.n_vocab = int(model.config.vocab_size)
        return sc


COMMANDS = [
    "# masters: 3-bit g128 NeUQI + GPTQ; SmolLM2 with the demo's calibration (16 x 512 tokens), Gemma-3-270M with",
    "# 8 x 256 (time); h8 = the same body plus an 8-bit head (quantize resumed from h0's finished blocks)",
    "neuqi-export quantize smollm2 -o out/sizes/smollm2-h0 --bits 3 --group-size 128 --gptq --nsamples 16 --seqlen 512",
    "neuqi-export quantize smollm2 -o out/sizes/smollm2-h8r --bits 3 --group-size 128 --gptq --nsamples 16 --seqlen 512 --lm-head-bits 8",
    "neuqi-export quantize smollm2 -o out/sizes/smollm2-int --bits 3 --group-size 128 --gptq --nsamples 16 --seqlen 512 --init neuqi_int",
    "neuqi-export quantize gemma3-270m -o out/sizes/gemma3-270m-h0 --bits 3 --group-size 128 --gptq --nsamples 8 --seqlen 256",
    "neuqi-export quantize gemma3-270m -o out/sizes/gemma3-270m-h8r --bits 3 --group-size 128 --gptq --nsamples 8 --seqlen 256 --lm-head-bits 8",
    "OMP_NUM_THREADS=1 python tools/format_sizes.py --model smollm2 --masters out/sizes/smollm2-{h0,h8r,int}",
    "OMP_NUM_THREADS=1 python tools/format_sizes.py --model gemma3-270m --masters out/sizes/gemma3-270m-{h0,h8r,int}",
    "python tools/format_sizes.py --model x --masters - - - --doc docs/SIZES.md",
]


def _ppl(nll: list, seqlen: int, k: int) -> float:
    import math

    return math.exp(sum(nll[:k]) / (k * (seqlen - 1)))


def render(results: dict) -> str:
    """docs/SIZES.md's tables from the cached results: per model every row, then the head decision."""
    lines = ["# File sizes and perplexity per format: half-precision floats, the head, exact compressed-tensors", "",
             "Generated by `tools/format_sizes.py` (issue 24) from its cached results:", "",
             "```", *COMMANDS, "```", "",
             "Each row is `neuqi-export export MASTER --to FMT -o OUT [options]` scored in its own runtime (what "
             "`neuqi-export eval OUT` uses: onnxruntime with the default accuracy_level 4, llama.cpp, mlx-lm on the CPU "
             "computing the stored values in fp32, transformers for compressed-tensors) on the same token windows of "
             "the held-out Wikipedia text; MLX on the first window(s) only (mlx-lm's Linux CPU build is slow), with the "
             "master on the same windows beside it. Size = the weight files (MiB); bits/weight = 8 x size / the "
             "model's parameters (embeddings included). \"before\" rows use `--float-storage fp32` (the layout the "
             "exporters wrote before issue 24; ONNX had moved to half already), and compressed-tensors \"before\" is "
             "`export` of the float-zero-point master (refit). The machine: 2 shared CPU cores under heavy load, so "
             "few windows; the rows differ only by the stored values, so the comparison is paired.", ""]
    for model, res in results.items():
        w = res["windows"]
        n, k, L = w["n"], w["mlx"], w["seqlen"]
        h0 = res["master h0"]
        lines += [f"### {model}", "",
                  f"{n} windows x {L} tokens (ids sha256 `{w['sha256']}`), MLX on the first {k}. Master perplexity: "
                  + "; ".join(f"{label} {_ppl(res[m]['nll'], L, n):.3f} ({_ppl(res[m]['nll'], L, k):.3f} on {k})"
                              for label, m in (("float head", "master h0"), ("8-bit head", "master h8"),
                                               ("neuqi_int", "master int")) if m in res)
                  + f"; parameters {h0['n_params']:,}.", "",
                  "| row | runtime | what | size (MiB) | bits/weight | windows | perplexity | master, same windows | "
                  "vs master | tensors not exact |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for key, tag, fmt, opts, what in ROWS:
            r = res.get(key)
            if r is None:
                continue
            m = _ppl(res[f"master {tag}"]["nll"], L, r["windows"])
            lines.append(f"| `{key}` | {r['runtime']} | {what} | {r['bytes'] / 2**20:.1f} | "
                         f"{8 * r['bytes'] / h0['n_params']:.2f} | {r['windows']} | {r['ppl']:.3f} | {m:.3f} | "
                         f"{100 * (r['ppl'] / m - 1):+.2f}% | {r['not_exact']} / {r['tensors']} |")
        lines += ["", "Head (`--lm-head-bits 8` vs float, both with the default float storage): ", "",
                  "| format | size float head (MiB) | size 8-bit head (MiB) | ppl float head | ppl 8-bit head | change |",
                  "|---|---:|---:|---:|---:|---:|"]
        for fmt, a, b in (("onnx", "onnx h0 half", "onnx h8 half"), ("gguf", "gguf h0", "gguf h8"),
                          ("mlx", "mlx h0 half", "mlx h8 half"), ("mlx-lm", "mlx h0 half mlx-lm", "mlx h8 half mlx-lm"),
                          ("master", "master h0", "master h8")):
            if a in res and b in res:
                ra, rb = res[a], res[b]
                lines.append(f"| {fmt} | {ra['bytes'] / 2**20:.1f} | {rb['bytes'] / 2**20:.1f} | {ra['ppl']:.3f} | "
                             f"{rb['ppl']:.3f} | {100 * (rb['ppl'] / ra['ppl'] - 1):+.2f}% |")
        lines.append("")
    return "\n".join(lines + DECISIONS)


DECISIONS = [
    "## What the defaults are now, and why", "",
    "- **Float storage** (`--float-storage half|exact|fp32`, one option for onnx, mlx and compressed-tensors, "
    "converters/float_storage.py): `half` is the default everywhere. ONNX stores each float weight in bf16 or fp16, "
    "whichever is lossless, else fp16 rounded; MLX stores the float weights and the scales/biases in the model's "
    "half dtype as mlx-lm writes its models (bf16 for a bf16 checkpoint, float16 otherwise -- both fetched models "
    "have float32 configs whose embeddings are not bf16 values, so float16); compressed-tensors stores the float "
    "tensors in that same dtype and keeps weight_scale fp32 (so an integer-zero-point master stays exact; "
    "`--ct-scale-dtype` narrows it). `exact` keeps half only where lossless (else fp32), `fp32` is the layout "
    "before issue 24. The MLX runtime here casts the stored half values to fp32 after loading (MLX's CPU half "
    "kernels are 8-38x slower); on Apple silicon mlx-lm computes in the stored dtype.",
    "- **Head** (rule: the smaller file at no more than +0.1% perplexity, in the format's runtime at its default "
    "settings, on both real models; an option must pass on both): `convert --to mlx` quantizes the head at 8 bits (Exporter.head_bits = 8 in "
    "converters/mlx.py); `convert --to onnx` keeps it float: the 8-bit head costs well over 0.1% in onnxruntime at "
    "the default accuracy_level 4, whose int8 activations feed the 8-bit head's MatMulNBits (the master with the same "
    "head is within 0.1%, so `--accuracy-level 1 --lm-head-bits 8` is the small exact-ish route, at a decode-speed "
    "cost); GGUF keeps it float (token_embd is Q8_0 either way, so the file is the same size and the 8-bit codes are "
    "refit into Q8_0); compressed-tensors keeps it float (transformers' loader drops a packed lm_head). "
    "`--lm-head-bits float` or `--lm-head-bits B` overrides; `quantize` keeps the float head unless asked.",
    "- **compressed-tensors** is exact by default: `convert --to compressed-tensors` quantizes with `--init neuqi_int` "
    "(Exporter.init), so every linear holds the master's values (tests/converters/test_compressed_tensors_exact.py "
    "checks the unpacked weights against the master bit for bit); `export` of a float-zero-point master refits and "
    "prints one warning with the measured error and the exact route (the `ct h0` rows above). With the default "
    "`half` storage the one float tensor of the fetched SmolLM2 that is not a half value (its embedding) is rounded "
    "to float16 (reported); `--float-storage exact` makes every tensor exact (`ct int exact`).",
    "",
    "## Open findings", "",
    "- Gemma-3-270M in ONNX: `half` storage (the ONNX default before this issue's other items) measured +2.4% "
    "perplexity against `--float-storage fp32` (107.87 vs 105.29, 2 windows), although its only rounded tensor, the "
    "embedding, moves by at most 2.6e-4 of its largest value; and the 8-bit head (its embedding then "
    "GatherBlockQuantized) scores better than both (102.62, master 103.35). Not explained yet; worth a follow-up "
    "before relying on the ONNX half default for Gemma. SmolLM2's ONNX rows show no such effect.",
    "",
    "## Not measured (time: 2 CPU cores shared by several jobs)", "",
    "- Gemma-3-270M in MLX: the file's-values scorer does not apply (the exporter rescales Gemma's norms for mlx-lm's "
    "bf16 embedding scale) and mlx-lm itself took 11 min per window here; the MLX head choice on Gemma rests on the "
    "master (8-bit head +0.01%), whose values the MLX file holds (on SmolLM2 the MLX file's change, +0.08%, matched "
    "the master's, +0.07%).",
    "- Gemma-3-270M in GGUF: the exporter stops on its tokenizer (\"unrecognised BPE pre-tokenizer\"; "
    "`--tokenizer-pre` is the documented fix), and in compressed-tensors: no neuqi_int Gemma master was made in time.",
    "- SmolLM2 rows missing from the table above were still queued when the report was cut.",
    "",
]


if __name__ == "__main__":
    sys.exit(main())
