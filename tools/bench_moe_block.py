#!/usr/bin/env python3
"""Quantize time of a mixture-of-experts block against dense blocks of the same active and the same total size.

Three tiny-ish random models from tests/model_factory.py, same attention, same hidden size, same calibration:
  moe           qwen3_moe: --experts E experts of width --expert-width I, top --top-k k
  dense-active  qwen3 with intermediate k·I (the FFN work one token does in the MoE block)
  dense-total   qwen3 with intermediate E·I (as many FFN weights as the MoE block)
each quantized by the real pipeline (NeUQI + GPTQ, g32, --nsamples × --seqlen tokens) in this process, on
--threads torch threads. Per block = (total - load) / layers; the stage split is the pipeline's own timer
(neuqi_export/timing.py).

    python tools/bench_moe_block.py                      # hidden 512, 8 experts × 256, top-2, 2 layers
    python tools/bench_moe_block.py --experts 16 --top-k 4 --threads 2
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests", ROOT / "tests" / "converters"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def stage_seconds(timing: str) -> dict[str, float]:
    """{stage: seconds} from a StageTimer.report() line ('time: load 1.2 s (3%), ...; total 40.1 s')."""
    body = timing.split("time:", 1)[-1].split(";")[0]
    return {m[1].strip(): float(m[2]) for m in re.finditer(r"([a-z ]+?) ([0-9.]+) s \(", body)}


def models(args) -> dict[str, tuple[str, dict]]:
    """{row: (model_type, factory overrides)}."""
    base = dict(hidden=args.hidden, num_hidden_layers=args.layers)
    moe = dict(num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.expert_width)
    return {"moe": ("qwen3_moe", {**base, **moe}),
            "dense-active": ("qwen3", {**base, "intermediate": args.top_k * args.expert_width}),
            "dense-total": ("qwen3", {**base, "intermediate": args.experts * args.expert_width})}


def measure(model_type: str, overrides: dict, args, work: Path) -> dict:
    import torch
    from gguf_fixtures import build_tokenizer, corpus
    from model_factory import build_model

    from neuqi_export.pipeline import QuantizeOptions, quantize_model

    src = work / f"{model_type}-{overrides.get('intermediate', 'moe')}"
    vocab = build_tokenizer(src, "smollm")
    build_model(model_type, vocab, seed=0, **overrides).save_pretrained(str(src))
    torch.set_num_threads(args.threads)
    opts = QuantizeOptions(bits=4, group_size=32, init="neuqi", gptq=True, nsamples=args.nsamples, seqlen=args.seqlen)
    summary = quantize_model(src, work / f"{src.name}-master", opts, calib_text="\n\n".join(corpus(2000, seed=3)),
                             progress=False, force=True)
    stages = stage_seconds(summary.timing)
    per_block = (summary.seconds - stages.get("load", 0.0)) / args.layers
    return {"linears": summary.layers, "seconds": summary.seconds, "per_block": per_block, "stages": stages,
            "experts": str(summary).splitlines()[0] if model_type == "qwen3_moe" else ""}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--expert-width", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        for name, (mt, over) in models(args).items():
            rows[name] = measure(mt, over, args, Path(tmp))
            print(name, f"{rows[name]['per_block']:.2f} s per block", flush=True)
    cmd = " ".join(["python tools/bench_moe_block.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"\n`{cmd}`\n")
    print("| block | linears per block | s per block | × dense-active | stages (whole run) |")
    print("|---|---|---|---|---|")
    ref = rows["dense-active"]["per_block"]
    for name, r in rows.items():
        st = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items() if k != "load" and v >= 0.05)
        print(f"| {name} | {r['linears'] // args.layers} | {r['per_block']:.2f} | {r['per_block'] / ref:.2f} | {st} |")
    if rows["moe"]["experts"]:
        print(f"\n{rows['moe']['experts']}")


if __name__ == "__main__":
    main()
