"""docs/RELIABILITY.md from one run of the harness: the broken-input cases per file kind (with the worst time and
memory a hostile size cost), the kill trials and their resume equality, the full-disk and the concurrent runs."""
from __future__ import annotations

from pathlib import Path

from .kill import ALLOWED_TO_DIFFER
from .runner import MEM_LIMIT, TIMEOUT
from .scenarios import DISK_CAP


def _cell(s: str) -> str:
    return str(s).replace("|", "/").replace("\n", " ")


def input_section(rows: list) -> list[str]:
    """The summary per file kind, the hostile sizes' worst cost and every case."""
    lines = [f"Each case breaks a copy of one real file of a tiny llama model, runs the real CLI on it in a forked "
             f"child of a preloaded interpreter (its own process: RLIMIT_AS = the parent's + {MEM_LIMIT >> 30} GB, "
             f"SIGKILL after {TIMEOUT} s), and is OK when it ends with exit 2, one line on stderr naming the file and "
             "nothing under the final output name. Exit 0 is OK instead, when the output equals a clean run's, for the "
             "toolkit's own resume caches (`<out>.partial`: the damaged part is recomputed) and for an extra tensor in "
             "a HF checkpoint (ignored, as transformers does: real checkpoints carry tensors the model class does not "
             "use, such as rotary `inv_freq` buffers, a tied `lm_head.weight` or multi-token-prediction layers). An "
             "unknown tensor in a master is refused. Peak memory is the child's max RSS (the interpreter with torch "
             "imported is most of it).", "",
             "| file kind | cases | OK | FAIL | worst time (s) | worst peak RSS (MB) |", "|---|---|---|---|---|---|"]
    for k in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == k]
        ok = sum(r["ok"] for r in rs)
        lines.append(f"| {k} | {len(rs)} | {ok} | {len(rs) - ok} | {max(r['seconds'] for r in rs):.1f} | "
                     f"{max(r['peak_mb'] for r in rs):.0f} |")
    tot = sum(r["ok"] for r in rows)
    lines += [f"| **all** | {len(rows)} | {tot} | {len(rows) - tot} | | |", ""]
    hostile = [r for r in rows if "claims" in r["name"]]
    if hostile:
        w = max(hostile, key=lambda r: r["seconds"])
        m = max(hostile, key=lambda r: r["peak_mb"])
        lines += [f"Hostile sizes ({len(hostile)} cases: headers, counts or shapes claiming terabytes): worst time "
                  f"{w['seconds']:.1f} s ({w['kind']}: {w['name']}), worst peak RSS {m['peak_mb']:.0f} MB "
                  f"({m['kind']}: {m['name']}).", ""]
    return lines


def case_table(rows: list) -> list[str]:
    lines = ["## Every case", "", "| kind | case | result | how it ended | s | MB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['name']} | {'OK' if r['ok'] else 'FAIL'} | {_cell(r['how'])} | "
                     f"{r['seconds']:.1f} | {r['peak_mb']:.0f} |")
    return lines + [""]


def kill_section(rows: list) -> list[str]:
    """One line per command: trials, kills, what the kills left, how many reruns were byte-identical, leftovers."""
    n = max((len(r["trials"]) - 1 for r in rows), default=0)
    lines = ["## Killed runs", "",
             "Each command is first run uninterrupted (the reference). Then one trial SIGKILLs it at its most fragile "
             "point (quantize: once its first block is finished under `<out>.partial`; distill: once its first "
             "training checkpoint exists; an export: while its temporary output is being written), and "
             f"{n} seeded trials SIGKILL it once or twice (the resumed run killed again) at a random point of its "
             "writing: f × the reference's writing time after the run starts writing (its first changed file beside "
             "the output, its lock aside: `<out>.partial`'s state, a block, a checkpoint, a temporary), f uniform in "
             "5..95 % (a kill during the start-up before it leaves nothing to resume); after the kills the same "
             "command is rerun to the end. OK: the rerun exits 0 and every file it wrote has the "
             "reference's sha256 "
             f"({', '.join(sorted(ALLOWED_TO_DIFFER))} excepted: wall-clock seconds), the final name never held a "
             "half-written output between kills, and no temporary file, lock or `<out>.partial` is left after it. A "
             "kill that lands after the final rename (the output whole and equal to the reference; a rerun would only "
             "say it exists) can leave `<out>.lock` behind: the lock is an flock, released by the kernel with the "
             "process, so the file is inert and the next run on that output takes it and removes it; such trials are "
             "counted under 'stale lock' and not as a failure.", "",
             "| command | reference (s) | writes from (s) | files | trials | kills | output whole before a kill took effect | "
             "what the kills left "
             "| identical reruns | stale lock | leftovers | OK |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["trials"]
        ok = sum(x["ok"] for x in t)
        left = sorted({name for x in t for name in x["leftovers"]})
        states = sorted({s for x in t for s in x["after_kill"]})
        lines.append(f"| {r['command']} | {r['reference_s']:.1f} | {r['writes_from_s']:.1f} | {r['files']} | {len(t)} | "
                     f"{sum(len(x['kills']) for x in t)} | {sum(x['finished_before_kill'] for x in t)} | "
                     f"{_cell('; '.join(states))} | {sum(x['identical'] for x in t)}/{len(t)} | "
                     f"{sum(x.get('stale_lock', False) for x in t)} | "
                     f"{_cell(', '.join(left)) or 'none'} | {ok}/{len(t)} |")
    bad = [(r["command"], x) for r in rows for x in r["trials"] if not x["ok"]]
    for cmd, x in bad:
        lines.append(f"- {cmd}, kills {x['kills']} s into its writing: differs {x['differs'][:5]}, leftovers {x['leftovers']}, "
                     f"{_cell('; '.join(x['notes']))}")
    return lines + [""]


def scenario_section(title: str, intro: str, rows: list) -> list[str]:
    lines = [f"## {title}", "", intro, "", "| run | OK | exit | stderr lines | how it ended | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{_cell(r['name'])}` | {'OK' if r['ok'] else 'FAIL'} | {r['rc']} | {r['lines']} | "
                     f"{_cell(r['how'])} | {r['seconds']:.1f} |")
    return lines + [""]


def write_doc(path: Path, command: str, inputs: list, kills: list, disk: list, lock: list) -> None:
    """docs/RELIABILITY.md (at `path`) from the sections this run made (an empty one is left out)."""
    lines = ["# Reliability: broken and hostile inputs, killed runs, full disks (issue 23)", "",
             f"Written by `{command}` (tools/fuzz/: mutations, cases, runner, kill, scenarios, doc).", ""]
    if inputs:
        lines += ["## Broken and hostile inputs", ""] + input_section(inputs)
    if kills:
        lines += kill_section(kills)
    if disk:
        lines += scenario_section("Full disk", f"Every write capped at {DISK_CAP >> 10} KB per file (RLIMIT_FSIZE in "
                                  "the forked child: EFBIG, as on a full disk). OK: one line, exit 2, nothing under "
                                  "the final name and no temp left beside it.", disk)
    if lock:
        lines += scenario_section("Two runs on one output", "The same command started twice on one `-o`, the second "
                                  "0.5 s after the first. OK: one exits 0 (a quantize output equal to a clean run's), "
                                  "the other exits 2 in one line saying another run holds the output.", lock)
    if inputs:
        lines += case_table(inputs)
    path.write_text("\n".join(lines).rstrip() + "\n")
