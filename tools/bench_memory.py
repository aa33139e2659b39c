"""Peak memory and time of quantize and export against model depth, on LLaMA-2-7B-shaped random checkpoints.

    python tools/bench_memory.py [--depths 2 4 8 16] [--gptq] [--formats gguf onnx] [--work DIR] [--note TEXT]
                                 [--rows docs/memory_bench.json] [--keep]

Each depth is a random bf16 checkpoint of LLaMA-2-7B's block shape (hidden 4096, FFN 11008, 32 heads) written
block by block as safetensors shards with an index (never held whole), with the fetched SmolLM2 tokenizer, so the
vocabulary is its 49152 (LLaMA-2's is 32000; the calibration text must tokenize inside the table). Every command
runs as its own process: its peak RSS (the kernel's ru_maxrss of that child, what /usr/bin/time -v reports as
"Maximum resident set size") and wall time are the numbers. The goal (issue 21): peak RSS flat in depth. The table, the per-block slope of a least-squares line through
the peaks, and the 70B figure on paper go to docs/MEMORY.md with the command. Each measured stage is kept in --rows
(committed, with the machine it ran on), so a later run adds a depth or a format without redoing the others.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE_7B = dict(hidden=4096, ffn=11008, heads=32, kv_heads=32)
SHAPE_70B = dict(hidden=8192, ffn=28672, heads=64, kv_heads=8)
# ONNX below 1.8 GiB is one file (protobuf serializes it whole, so the export holds the file's bytes); a big model's
# export streams its initializers to model.onnx.data, and that is the path the benchmark measures at every depth
EXPORT_FLAGS = {"onnx": ["--external-data"]}


def block_params(hidden: int, ffn: int, heads: int, kv_heads: int) -> int:
    kv = hidden // heads * kv_heads
    return 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * ffn + 2 * hidden


def write_checkpoint(out: Path, depth: int, vocab: int, tokenizer_dir: Path, seed: int = 0,
                     shape: dict = SHAPE_7B) -> int:
    """A random bf16 LLaMA checkpoint of `depth` blocks of `shape` (default 7B's), one shard per block; returns its
    bytes."""
    import torch
    from safetensors.torch import save_file

    h, f = shape["hidden"], shape["ffn"]
    kv = h // shape["heads"] * shape["kv_heads"]
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total = {}, 0
    shards = [("embed", {"model.embed_tokens.weight": rand(vocab, h)})]
    for k in range(depth):
        p = f"model.layers.{k}."
        shards.append((f"block{k}", {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(f, h), p + "mlp.up_proj.weight": rand(f, h),
            p + "mlp.down_proj.weight": rand(h, f),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}))
    shards.append(("head", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, h)}))
    n = len(shards)
    for i, (_, tensors) in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        total += (out / name).stat().st_size
        weight_map.update({t: name for t in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": f,
              "num_hidden_layers": depth, "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["kv_heads"], "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / fname).is_file():
            shutil.copy2(tokenizer_dir / fname, out / fname)
    return total


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd as a child process: its peak RSS (the kernel's ru_maxrss, as /usr/bin/time -v reports it) and wall
    time, {'rss_gb', 'seconds'}; raises with the tail of its output on failure."""
    import os
    import tempfile
    import time

    with tempfile.TemporaryFile("w+") as log:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        secs = time.monotonic() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {log.read()[-1500:]}")
    return {"rss_gb": usage.ru_maxrss / 2**20, "seconds": secs}  # ru_maxrss: KiB on Linux


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys over xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 4, 8, 16])
    ap.add_argument("--formats", nargs="*", default=["gguf", "onnx"])
    ap.add_argument("--gptq", action="store_true")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--work", default="/tmp/bench_memory")
    ap.add_argument("--out", default=str(ROOT / "docs" / "MEMORY.md"))
    ap.add_argument("--note", default="")
    ap.add_argument("--rows", default=str(ROOT / "docs" / "memory_bench.json"),
                    help="the measured rows, read first and extended (default: docs/memory_bench.json, committed)")
    ap.add_argument("--keep", action="store_true", help="keep each depth's checkpoint and master (default: deleted "
                    "once its row is measured; the rows are cached in --rows)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from neuqi_export.assets import fetch_assets

    assets = fetch_assets()
    vocab = json.loads((assets.model_dir / "config.json").read_text())["vocab_size"]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "neuqi_export.cli"]
    cache = Path(args.rows)  # measured stages, kept across runs and sessions (a later run adds depths or formats)
    done = json.loads(cache.read_text()) if cache.is_file() else {}
    setting = f"c{args.nsamples}x{args.seqlen}" + ("-gptq" if args.gptq else "")
    command = command_line(args)
    if "imports" not in done:  # the process before any model: what every command's peak has under it
        done["imports"] = timed([sys.executable, "-c", "import torch, transformers, neuqi_export.pipeline"])
    rows = []
    for depth in args.depths:
        row = done.setdefault(f"{depth}-{setting}", {"depth": depth, "command": command, "machine": machine()})
        ckpt, master = work / f"ckpt{depth}", work / f"master{depth}"
        need_quantize = "quantize" not in row or (not (master / "config.json").is_file() and set(args.formats) - set(row))
        if need_quantize and not (ckpt / "config.json").is_file():
            write_checkpoint(ckpt, depth, vocab, assets.model_dir)
        if "disk_gb" not in row:
            row["disk_gb"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30
        q = ["quantize", str(ckpt), "-o", str(master), "--bits", "4", "--group-size", "128", "--nsamples",
             str(args.nsamples), "--seqlen", str(args.seqlen), "--force", "--quiet"] + (["--gptq"] if args.gptq else [])
        if need_quantize:
            row["quantize"] = timed(cli + q)
        for fmt in args.formats:
            if fmt in row:
                continue
            out = work / f"m{depth}.{fmt}"
            row[fmt] = timed(cli + ["export", str(master), "--to", fmt, "-o", str(out), "--force", "--quiet",
                                    *EXPORT_FLAGS.get(fmt, [])])
            row[fmt]["bytes_gb"] = (sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir()
                                    else out.stat().st_size) / 2**30
            shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
            cache.write_text(json.dumps(done, indent=1))
        cache.write_text(json.dumps(done, indent=1))
        if not args.keep:  # the row is measured: free the disk for the next depth
            shutil.rmtree(ckpt, ignore_errors=True)
            shutil.rmtree(master, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_doc(sorted(rows, key=lambda r: r["depth"]), args, Path(args.out), done["imports"]["rss_gb"])


def machine() -> str:
    """The CPU model, core count and RAM of this machine (rows measured on different machines are told apart)."""
    import os

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB"


def command_line(args) -> str:
    return "python tools/bench_memory.py " + " ".join(
        [f"--depths {' '.join(map(str, args.depths))}", f"--formats {' '.join(args.formats)}",
         f"--nsamples {args.nsamples}", f"--seqlen {args.seqlen}"] + (["--gptq"] if args.gptq else [])
        + ([f"--note '{args.note}'"] if args.note else []))


def write_doc(rows: list[dict], args, out: Path, imports_gb: float) -> None:
    stages = ["quantize", *[f for f in ("gguf", "onnx", "mlx", "compressed-tensors") if any(f in r for r in rows)]]
    commands = list(dict.fromkeys(r["command"] for r in rows))
    machines = list(dict.fromkeys(r.get("machine", "?") for r in rows))
    lines = ["# Memory against depth (issue 21)", "",
             "Command" + ("s" if len(commands) > 1 else "") + ": " + "; ".join(f"`{c}`" for c in commands), "",
             "Random bf16 checkpoints of LLaMA-2-7B's block shape (hidden 4096, FFN 11008, 32 heads; vocabulary 49152, "
             "the SmolLM2 tokenizer's), 4-bit g128 NeUQI" + (" + GPTQ" if args.gptq else " (no GPTQ)")
             + f", {args.nsamples} x {args.seqlen} calibration tokens. Peak RSS and wall time of each command as its own "
             "process (the kernel's ru_maxrss of the child, as /usr/bin/time -v reports it). ONNX with "
             "`--external-data` (what a model over 1.8 GiB gets anyway; below that the file is one protobuf, "
             "serialized whole, so its export holds the file's bytes)."
             + f" Machine{'s' if len(machines) > 1 else ''}: {'; '.join(machines)}."
             + (f" {args.note}" if args.note else ""), "",
             "| blocks | checkpoint GiB | " + " | ".join(f"{s} peak RSS GiB | {s} s" for s in stages) + " |",
             "|---|---|" + "---|---|" * len(stages)]
    for r in rows:
        lines.append(f"| {r['depth']} | {r['disk_gb']:.2f} | " + " | ".join(
            f"{r[s]['rss_gb']:.2f} | {r[s]['seconds']:.0f}" if s in r else "— | —" for s in stages) + " |")
    lines.append("")
    if len(rows) >= 2:
        xs = [r["depth"] for r in rows]
        per_block_bytes = block_params(**SHAPE_7B) * 2 / 2**30
        for s in stages:
            have = [r for r in rows if s in r]
            if len(have) < 2:
                continue
            a, b = slope([r["depth"] for r in have], [r[s]["rss_gb"] for r in have])
            lines.append(f"- {s}: peak RSS ≈ {a:.2f} + {b:.3f} GiB per block (one block is {per_block_bytes:.2f} GiB "
                         "in bf16, twice that in fp32)")
        ratio = block_params(**SHAPE_70B) / block_params(**SHAPE_7B)
        fp32_70b = block_params(**SHAPE_70B) * 4 / 2**30
        lines += ["", f"On paper, 70B (80 blocks of hidden 8192, FFN 28672, 64 heads, GQA 8): a block has {ratio:.2f}x the "
                  f"parameters of this one ({fp32_70b:.2f} GiB in fp32). The Python process before any model holds "
                  f"{imports_gb:.2f} GiB (torch, transformers, neuqi_export imported). If everything else in a "
                  "command's largest peak here grew with the block (an upper bound: the embedding, 32000 x 8192 for "
                  "LLaMA-2-70B against 49152 x 4096 here, grows 1.3x, the activations 2x), plus its per-block slope "
                  "scaled to 80 such blocks where the slope is positive:", ""]
        for s in stages:
            have = [r for r in rows if s in r]
            if len(have) < 2:
                continue
            peak = max(r[s]["rss_gb"] for r in have)
            _, b = slope([r["depth"] for r in have], [r[s]["rss_gb"] for r in have])
            _, secs = slope([r["depth"] for r in have], [r[s]["seconds"] for r in have])
            est = imports_gb + (peak - imports_gb) * ratio + max(b, 0.0) * ratio * 80
            lines.append(f"- {s}: {imports_gb:.2f} + ({peak:.2f} - {imports_gb:.2f}) x {ratio:.2f}"
                         + (f" + {b:.3f} x {ratio:.2f} x 80" if b > 0 else "") + f" = {est:.1f} GiB peak; "
                         + (f"{secs:.0f} s per block here, so ~{secs * ratio * 80 / 3600:.1f} h for 80 blocks at this speed"
                            if secs > 0 else "its time does not grow with depth here"))
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
