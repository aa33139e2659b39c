"""The harness's command line (tools/fuzz_inputs.py runs it): the broken-input cases, the kill trials, the
full-disk and the concurrent runs, and docs/RELIABILITY.md from them."""
from __future__ import annotations

import argparse
from pathlib import Path

SECTIONS = ("inputs", "kill", "disk", "lock")


def main(argv=None) -> int:
    from .bases import clean_shas, make_bases
    from .cases import cases
    from .doc import write_doc
    from .kill import run_trials
    from .runner import preload, run_case
    from .scenarios import concurrency_runs, disk_full_runs

    ap = argparse.ArgumentParser(description="Fuzz every file the toolkit reads, kill its runs, fill its disk "
                                             "(issue 23); write docs/RELIABILITY.md.")
    ap.add_argument("--kinds", default=None, help="comma-separated file kinds of the input cases (default: all)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which parts to run (default: {','.join(SECTIONS)})")
    ap.add_argument("--kill-trials", type=int, default=4, help="kill trials per command (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    ap.add_argument("--work", default="/tmp/neuqi-fuzz", help="where the base artifacts and cases live")
    ap.add_argument("--doc", default=None, help="write the results here (e.g. docs/RELIABILITY.md)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}; choose from {','.join(SECTIONS)}")
    work = Path(args.work)
    bases = make_bases(work / "bases")
    clean = clean_shas(bases)
    preload()
    rows, kills, disk, lock, bad = [], [], [], [], 0
    if "inputs" in sections:
        todo = [c for c in cases() if args.kinds is None or c.kind in args.kinds.split(",")]
        for i, c in enumerate(todo):
            r = run_case(c, bases, work / "case", clean)
            rows.append(r)
            print(f"[{i + 1}/{len(todo)}] {r['kind']:14s} {'OK  ' if r['ok'] else 'FAIL'} {r['seconds']:5.1f}s "
                  f"{r['name']}: {r['how'][:200]}", flush=True)
        bad += sum(not r["ok"] for r in rows)
        print(f"{len(rows)} cases, {len(rows) - sum(not r['ok'] for r in rows)} OK", flush=True)
    if "kill" in sections and args.kill_trials > 0:
        kills = run_trials(bases, work / "kill", args.kill_trials, seed=args.seed,
                           log=lambda s: print(s, flush=True))
        bad += sum(not t["ok"] for k in kills for t in k["trials"])
    for name, fn, out in (("disk", lambda: disk_full_runs(bases, work / "disk"), disk),
                          ("lock", lambda: concurrency_runs(bases, work / "lock", clean), lock)):
        if name in sections:
            out.extend(fn())
            for r in out:
                print(f"[{name}] {'OK  ' if r['ok'] else 'FAIL'} {r['name']}: {r['how'][:200]}", flush=True)
            bad += sum(not r["ok"] for r in out)
    if args.doc:
        cmd = "PYTHONPATH=$PWD python tools/fuzz_inputs.py" + (f" --kinds {args.kinds}" if args.kinds else "") + \
              (f" --sections {args.sections}" if sections != set(SECTIONS) else "") + \
              (f" --kill-trials {args.kill_trials}" if "kill" in sections else "") + \
              (f" --seed {args.seed}" if args.seed else "") + f" --doc {args.doc}"
        write_doc(Path(args.doc), cmd, rows, kills, disk, lock)
    print(f"{bad} FAIL")
    return 0 if bad == 0 else 1
