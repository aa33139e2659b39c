#!/usr/bin/env python
"""Throughput of init_params (groups per second) on LLaMA-7B-shaped layers; writes docs/BENCH_INIT_<DEVICE>.md.

    python tools/bench_init.py --device cpu --rows 64
    python tools/bench_init.py --device cuda            # whole layers

Weights are synthetic (Student-t, 3 degrees of freedom, like real heavy-tailed LLM weights) with a random
positive diag(H); the loss does not matter here, only the time. With --rows N only the first N output rows
of each layer are timed: init_params treats every (row, group) independently with the same per-group
work, so groups/s measured on the subset is the layer's rate, and the full-layer time is EXTRAPOLATED as
total groups / rate (the table says so). One untimed warm-up call per configuration.

--impls times the implementations of neuqi/mse/neuqi_int side by side: `reference` (the torch path), `auto`
(the compiled numba kernels of neuqi_export/quant/fast_cpu*.py on the CPU when numba is installed, the Triton
kernels of neuqi_export/quant/fast_triton*.py on CUDA when triton is installed, else the torch path), `numba`
and `triton` (forced), `triton:RxW` (the Triton kernel launched with R groups per program and W warps: a
tuning sweep, e.g. `--impls reference triton:4x4 triton:8x4 triton:8x8 triton:16x8`). With --device cuda
the default is `reference triton`: the plain torch path and the Triton kernel, one row each, the Triton row with its loss ratio to the torch path. Each configuration reports the
MEDIAN of --repeats timed calls, in wall-clock seconds and in process CPU seconds (user + system of all
threads; on a shared, loaded machine the CPU seconds are the steadier measure of the work), and for
non-reference implementations the ratio of the summed diag-H loss to the reference's and the worst per-group
ratio.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuqi_export.quant.params import _have_triton, group_loss, init_params  # noqa: E402
import statistics  # noqa: E402

SHAPES = {"4096x4096": (4096, 4096), "11008x4096": (11008, 4096)}
# the linears of one LLaMA-2-7B block (q, k, v, o, gate, up, down) as (out, in); the model has 32 such blocks
BLOCK_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
MODEL = "llama2-7b-model"
HDIAG_METHODS = ("neuqi", "neuqi_int")  # the methods whose objective uses diag(H)


def _impl_opts(impl: str) -> dict:
    """init_params options of an --impls entry: auto|reference|numba|triton, or triton:RxW (rows per program x
    warps: the Triton launch shape, for tuning on a GPU)."""
    if impl == "-":
        return {"impl": "auto"}
    if impl.startswith("triton:"):
        r, w = impl.split(":", 1)[1].split("x")
        return {"impl": "triton", "triton_config": (int(r), int(w))}
    return {"impl": impl}


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_one(out: int, inp: int, rows: int, bits: int, gs: int, method: str, device: str, repeats: int,
              impl: str = "auto", ref_params=None) -> dict:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    W = (torch.distributions.StudentT(3.0).sample((rows, inp)) * 0.02).to(device)
    h = (torch.rand(inp, generator=g) ** 3 * 4 + 0.01).to(device)
    opts = {} if method == "minmax" else _impl_opts(impl)
    init_params(W[: min(rows, 8)], bits, gs, method, hdiag=h, **opts)  # warm-up (allocator, kernels, JIT)
    _sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        params = init_params(W, bits, gs, method, hdiag=h, **opts)
        _sync(device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    ng = -(-inp // gs)
    groups = rows * ng
    med = statistics.median(times)
    r = dict(groups=groups, seconds=med, cpu_seconds=statistics.median(cpu), rate=groups / med,
             cpu_rate=groups / statistics.median(cpu), full_groups=out * ng, full_seconds=out * ng / (groups / med),
             params=params, sum_ratio=None, max_ratio=None)
    if ref_params is not None:
        hl = h if method in HDIAG_METHODS else None
        lo = group_loss(W.cpu(), params[0].cpu(), params[1].cpu(), bits, gs, None if hl is None else hl.cpu())
        lr = group_loss(W.cpu(), ref_params[0].cpu(), ref_params[1].cpu(), bits, gs, None if hl is None else hl.cpu())
        r["sum_ratio"] = float(lo.sum() / lr.sum())
        r["max_ratio"] = float((lo / lr.clamp_min(1e-300)).max())
    return r


def bench_model(blocks: int, rows: int, bits: int, gs: int, method: str, device: str, impls: list[str],
                ref_blocks: int | None = None) -> dict:
    """A whole 7B-shaped model (`blocks` x the 7 linears of BLOCK_7B, each with its own random weights, one timed
    call each): per impl the summed seconds, groups/s, and the summed-loss ratio to the first impl, which runs
    only the first `ref_blocks` blocks when given (a slow reference: its whole-model time is then extrapolated,
    and the loss ratios compare those blocks)."""
    res = {i: dict(groups=0, seconds=0.0, cpu_seconds=0.0, loss=0.0, worst=1.0) for i in impls}
    ref_blocks = blocks if ref_blocks is None or len(impls) == 1 else min(ref_blocks, blocks)
    for b in range(blocks):
        for k, (out, inp) in enumerate(BLOCK_7B):
            g = torch.Generator().manual_seed(1000 * b + k)
            torch.manual_seed(1000 * b + k)
            n = out if rows <= 0 else min(rows, out)
            W = (torch.distributions.StudentT(3.0).sample((n, inp)) * 0.02).to(device)
            h = (torch.rand(inp, generator=g) ** 3 * 4 + 0.01).to(device)
            first = None
            for impl in impls if b < ref_blocks else impls[1:]:
                opts = {} if method == "minmax" else _impl_opts(impl)
                if b == 0 and k in (0, 4, 6):  # warm-up per shape (JIT, autotuning, allocator)
                    init_params(W[:8], bits, gs, method, hdiag=h, **opts)
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                s, z = init_params(W, bits, gs, method, hdiag=h, **opts)
                _sync(device)
                r = res[impl]
                r["seconds"] += time.perf_counter() - t
                r["cpu_seconds"] += time.process_time() - c
                r["groups"] += n * -(-inp // gs)
                if b >= ref_blocks:  # no reference loss to compare with: skip the (float64) loss
                    continue
                lo = group_loss(W, s, z, bits, gs, h if method in HDIAG_METHODS else None)
                r["loss"] += float(lo.sum())
                if first is None:
                    first = lo
                else:
                    r["worst"] = max(r["worst"], float((lo / first.clamp_min(1e-300)).max()))
    total = blocks * sum(o * -(-i // gs) for o, i in BLOCK_7B)
    base = res[impls[0]]["loss"]
    for r in res.values():
        r.update(rate=r["groups"] / r["seconds"], cpu_rate=r["groups"] / r["cpu_seconds"],
                 full_groups=32 * sum(o * -(-i // gs) for o, i in BLOCK_7B),
                 sum_ratio=r["loss"] / base if base > 0 else 1.0, max_ratio=r["worst"])
        r["full_seconds"] = r["full_groups"] / r["rate"]
        r["measured_all"] = r["groups"] == r["full_groups"] and total == r["full_groups"]
    return res


def _impl_arg(v: str) -> str:
    ok = v in ("auto", "reference", "numba", "triton")
    if v.startswith("triton:"):
        try:
            ok = all(n > 0 and n & (n - 1) == 0 for n in _impl_opts(v)["triton_config"])
        except ValueError:
            ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"{v!r}: use auto, reference, numba, triton or triton:RxW with powers of two (e.g. triton:8x4)")
    return v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=0, help="time only this many output rows per layer (0 = all) "
                   "and extrapolate the full-layer time from the measured groups/s")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES) + [MODEL],
                   help=f"layers to time; {MODEL}: every linear of a LLaMA-2-7B-shaped model (--blocks of them)")
    p.add_argument("--blocks", type=int, default=32, help=f"blocks of the {MODEL} row actually run (32 = the whole "
                   "model; fewer: the whole-model time is extrapolated from them)")
    p.add_argument("--ref-blocks", type=int, default=None, help=f"the {MODEL} row: run the first --impls entry (the "
                   "reference) on only this many blocks; its whole-model time is extrapolated and the loss ratios "
                   "compare those blocks (default: all --blocks)")
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["neuqi", "neuqi_int", "minmax"])
    p.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (the median is reported)")
    p.add_argument("--impls", nargs="+", default=None, type=_impl_arg,
                   help="implementations of neuqi/mse/neuqi_int to time (minmax has one), or triton:RxW; default: 'auto' on the "
                   "CPU, 'reference triton' on CUDA (the reference first: later rows get its loss ratio)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave torch's default)")
    p.add_argument("--note", default="", help="free text added to the report (e.g. machine load)")
    p.add_argument("--out", default=None, help="report file (default: docs/BENCH_INIT_CPU.md or docs/BENCH_INIT_CUDA.md)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available; use --device cpu", file=sys.stderr)
        return 2
    if args.out is None:
        args.out = str(Path(__file__).resolve().parents[1] / "docs" / f"BENCH_INIT_{args.device.upper()}.md")
    if args.impls is None:
        args.impls = ["reference", "triton"] if args.device == "cuda" and _have_triton() else ["auto"]
    if args.threads:
        torch.set_num_threads(args.threads)
    here = Path(__file__).resolve()  # the command as run from the repository root
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(here.relative_to(here.parents[1]))] + (argv or sys.argv[1:]))
    rows_out = []
    for shape in args.shapes:
        if shape == MODEL:
            for bits in args.bits:
                for method in args.methods:
                    impls = ["-"] if method == "minmax" else args.impls
                    res = bench_model(args.blocks, args.rows, bits, args.group_size, method, args.device, impls,
                                      args.ref_blocks)
                    for impl, r in res.items():
                        r["sum_ratio"] = None if impl == impls[0] else r["sum_ratio"]
                        rows_out.append((shape, bits, method, impl, args.rows, r))
                        print(f"{shape} ({args.blocks} blocks) {bits}-bit {method} {impl}: {r['groups']:,} groups in "
                              f"{r['seconds']:.2f} s = {r['rate']:,.0f} groups/s; whole model "
                              f"{'' if r['measured_all'] else '~'}{r['full_seconds']:.1f} s", flush=True)
            continue
        out, inp = SHAPES[shape]
        rows = out if args.rows <= 0 else min(args.rows, out)
        for bits in args.bits:
            for method in args.methods:
                ref = None
                impls = ["-"] if method == "minmax" else args.impls
                for impl in impls:
                    r = bench_one(out, inp, rows, bits, args.group_size, method, args.device, args.repeats,
                                  "auto" if impl == "-" else impl, ref)
                    if impl == "reference":
                        ref = r["params"]
                    rows_out.append((shape, bits, method, impl, rows, r))
                    extra = "" if r["sum_ratio"] is None else (
                        f"; loss vs reference: sum x{r['sum_ratio']:.9f}, worst group x{r['max_ratio']:.6f}")
                    print(f"{shape:>11} {bits}-bit g{args.group_size} {method:>9} {impl:>9}: {r['groups']:>7} groups "
                          f"in {r['seconds']:8.3f} s = {r['rate']:>10,.0f} groups/s (CPU {r['cpu_seconds']:.3f} s = "
                          f"{r['cpu_rate']:,.0f} groups/CPU-s); full layer {'~' if rows < out else ''}"
                          f"{r['full_seconds']:.1f} s{extra}", flush=True)
    lines = [
        "# init_params throughput",
        "",
        "Generated by `tools/bench_init.py` (synthetic Student-t weights, random positive diag(H)).",
        "",
        f"- command: `{cmd}`",
        f"- device: {args.device} — {_device_name(args.device)}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- group size {args.group_size}; median of {args.repeats} timed call(s) after one warm-up (wall and process "
        "CPU seconds); impl `reference` = the torch path, `numba` = the numba kernels (fast_cpu.py, fast_cpu_int.py), "
        "`triton` = the Triton kernels (fast_triton.py, fast_triton_int.py; `triton:RxW` launched with R groups per "
        "program and W warps), `auto` = numba on the CPU / Triton on CUDA when installed; loss ratio = "
        "Σ diag-H loss of the impl / that of `reference` (and the worst per-group ratio)",
    ]
    if args.note:
        lines.append(f"- note: {args.note}")
    if args.rows > 0:
        lines.append(f"- **only the first {args.rows} output rows of each layer were timed**; groups/s is measured on "
                     "that subset and the full-layer seconds are extrapolated (total groups / measured rate), "
                     "which is exact in work per group but ignores any batching gains of a larger call")
    lines += ["", "| layer (out×in) | bits | method | impl | rows timed | groups timed | seconds | groups/s | "
              "CPU s | groups/CPU-s | full layer s | loss / reference (sum; worst group) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if MODEL in args.shapes:
        lines.insert(-3, f"- {MODEL}: {args.blocks} block(s) × the 7 linears of a LLaMA-2-7B block "
                     f"(4 × 4096×4096, 2 × 11008×4096, 4096×11008), each its own random weights, one timed call each"
                     + ("" if args.blocks == 32 and args.rows <= 0 else "; whole-model seconds (32 blocks, all rows) "
                        "extrapolated from the measured groups/s (marked ~)")
                     + (f"; the reference (`{args.impls[0]}`) ran on the first {args.ref_blocks} block(s) only: its "
                        "whole-model time is extrapolated (~) and the loss ratios compare those blocks"
                        if args.ref_blocks is not None and args.ref_blocks < args.blocks and len(args.impls) > 1
                        else ""))
    for shape, bits, method, impl, rows, r in rows_out:
        if shape == MODEL:
            full = f"{'' if r['measured_all'] else '~'}{r['full_seconds']:.1f}"
            ratio = "" if r["sum_ratio"] is None else f"{r['sum_ratio']:.9f}; {r['max_ratio']:.6f}"
            lines.append(f"| {shape} | {bits} | {method} | {impl} | {rows or 'all'} | {r['groups']} | {r['seconds']:.3f} | "
                         f"{r['rate']:,.0f} | {r['cpu_seconds']:.3f} | {r['cpu_rate']:,.0f} | {full} | {ratio} |")
            continue
        full = f"{'~' if rows < SHAPES[shape][0] else ''}{r['full_seconds']:.1f}"
        ratio = "" if r["sum_ratio"] is None else f"{r['sum_ratio']:.9f}; {r['max_ratio']:.6f}"
        lines.append(f"| {shape} | {bits} | {method} | {impl} | {rows} | {r['groups']} | {r['seconds']:.3f} | "
                     f"{r['rate']:,.0f} | {r['cpu_seconds']:.3f} | {r['cpu_rate']:,.0f} | {full} | {ratio} |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
