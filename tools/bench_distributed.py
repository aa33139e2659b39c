#!/usr/bin/env python3
"""SmolLM2-135M NeUQI + GPTQ quantized by 1 and by N processes (torch.distributed, gloo on CPU), one thread each:
wall time, speedup, the time each stage took on rank 0 (its `communication` stage is the time spent in
collectives, waiting for the slower rank included), each rank's CPU seconds (what the wall time would be with a
free core per rank, less the waits), and the sha256 of both masters (over every tensor's sha256:
master_store.tensor_digests), which must be equal.

Each row is the real command in a subprocess (`neuqi-export quantize`, as N ranks with the
environment `--nproc N` gives them, OMP_NUM_THREADS=1). Writes
--output (default docs/DISTRIBUTED.md's measured section, printed) with the exact commands.

    python tools/bench_distributed.py                      # 1 vs 2 processes, 32 x 512 calibration tokens
    python tools/bench_distributed.py --nsamples 8 --seqlen 128   # quick look
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGE = re.compile(r"([a-z ]+?) ([\d.]+) s(?: \(\d+%\))?")


def stages(stdout: str) -> dict[str, float]:
    """{stage: seconds} from the 'time: ...' line quantize prints (rank 0's)."""
    for line in stdout.splitlines():
        if line.startswith("time: "):
            body = line[len("time: "):].split("; total")[0]
            return {m.group(1): float(m.group(2)) for m in (STAGE.fullmatch(p.strip()) for p in body.split(", ")) if m}
    return {}


def master_sha(path: Path) -> str:
    from neuqi_export.master_store import tensor_digests

    d = tensor_digests(path)
    return hashlib.sha256(json.dumps(sorted(d.items())).encode()).hexdigest()


def run(nproc: int, model: Path, calib: Path, out: Path, args, tmp: Path) -> dict:
    """One row: the command as N ranks (the --nproc launcher's environment, started here so that each rank's CPU
    seconds are measured with wait4); wall time, rank 0's stage times, CPU seconds per rank, master sha256."""
    from neuqi_export.cli.launch import _free_port, worker_env

    cmd = [sys.executable, "-m", "neuqi_export", "quantize", str(model), "-o", str(out), "--bits", str(args.bits),
           "--group-size", str(args.group_size), "--gptq", "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--calib", str(calib), "--device", "cpu", "--quiet", "--force"]
    port, procs = _free_port(), []
    t0 = time.perf_counter()
    for r in range(nproc):
        env = dict(worker_env(r, nproc, port) if nproc > 1 else os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        log = open(tmp / f"n{nproc}-rank{r}.log", "w")  # noqa: SIM115
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    cpu = []
    for p, log in procs:
        _, status, usage = os.wait4(p.pid, 0)
        log.close()
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{nproc} processes failed:\n{Path(log.name).read_text()[-3000:]}")
        cpu.append(round(usage.ru_utime + usage.ru_stime, 1))
    wall = time.perf_counter() - t0
    shown = ["OMP_NUM_THREADS=1", "neuqi-export", *cmd[3:]] + (["--nproc", str(nproc)] if nproc > 1 else [])
    return {"nproc": nproc, "wall": wall, "stages": stages((tmp / f"n{nproc}-rank0.log").read_text()),
            "cpu_per_rank": cpu, "sha256": master_sha(out),
            "command": shlex.join(shown).replace(str(model), "<SmolLM2>").replace(str(calib), "<calib.txt>")
            .replace(str(out), "m")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    from neuqi_export.assets import fetch_assets

    assets = fetch_assets()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        for n in (1, args.nproc):
            rows.append(run(n, assets.model_dir, assets.calib_text, Path(tmp) / f"m{n}", args, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(Path(tmp) / f"m{n}", ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    one, many = rows
    names = list(dict.fromkeys([*one["stages"], *many["stages"]]))
    lines = [f"| stage (rank 0) | 1 process | {args.nproc} processes |", "|---|---:|---:|"]
    lines += [f"| {k} | {one['stages'].get(k, 0):.1f} s | {many['stages'].get(k, 0):.1f} s |" for k in names]
    lines += [f"| **wall (command)** | **{one['wall']:.1f} s** | **{many['wall']:.1f} s** |",
              f"| CPU seconds per rank | {' / '.join(map(str, one['cpu_per_rank']))} | "
              f"{' / '.join(map(str, many['cpu_per_rank']))} |",
              "", f"speedup {one['wall'] / many['wall']:.2f}x; communication {many['stages'].get('communication', 0):.1f} s "
              f"= {100 * many['stages'].get('communication', 0) / many['wall']:.0f}% of the {args.nproc}-process wall time",
              "", f"- master sha256, 1 process: `{one['sha256']}`",
              f"- master sha256, {args.nproc} processes: `{many['sha256']}` "
              f"({'identical' if one['sha256'] == many['sha256'] else 'DIFFERENT'})",
              "", "```", one["command"], many["command"], "```"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
