"""Killed runs (issue 23 item 2): `quantize`, `export` to each format and `distill`, SIGKILLed at seeded random
points; the rerun of the same command must resume, finish (exit 0) and write files byte-identical (sha256 of
every file) to an uninterrupted run's. quantize_timing.json is the one file allowed to differ (wall-clock seconds).

A trial kills the command once or twice (the resumed run is killed again), then lets it finish. Between kills it
checks that the final name never holds a half-written output (absent, or already equal to the reference), and at
the end that no temporary file or directory was left beside the output or inside it.
"""
from __future__ import annotations

import hashlib
import random
import shutil
import time
from pathlib import Path

from .bases import DIST_ARGV, Q
from .runner import TIMEOUT, reap, spawn

ALLOWED_TO_DIFFER = {"quantize_timing.json"}  # pipeline.TIMING_FILE: wall-clock seconds of each stage
EXPORTS = ("gguf", "onnx", "mlx", "compressed-tensors")
# distill with more steps than the fuzz bases use and a checkpoint every 2 steps, so kills land between checkpoints
KILL_DISTILL = [*DIST_ARGV[:4], "--steps", "8", "--checkpoint-every", "2", *DIST_ARGV[6:]]
QUICK_DISTILL = [*DIST_ARGV[:4], "--steps", "4", "--checkpoint-every", "2", *DIST_ARGV[6:]]


def commands(bases: dict, quick: bool = False) -> dict:
    """name -> f(out_parent) -> (argv, out): the commands the trials kill (`quick`, for CI: quantize without
    calibration, distill for 4 steps)."""
    def quantize(d: Path):
        calib = ["--no-calib", "--bits", "4", "--group-size", "32", "--quiet"] if quick else \
            ["--calib", str(bases["calib"]), *Q]
        return ["quantize", str(bases["hf"]), "-o", str(d / "out"), *calib], d / "out"

    def export(fmt: str):
        def f(d: Path):
            out = d / ("out.gguf" if fmt == "gguf" else "out")
            return ["export", str(bases["master"]), "--to", fmt, "-o", str(out), "--quiet"], out
        return f

    def distill(d: Path):
        return ["distill", str(bases["master"]), "--teacher", str(bases["hf"]), "--text", str(bases["calib"]),
                "-o", str(d / "out"), *(QUICK_DISTILL if quick else KILL_DISTILL)], d / "out"

    return {"quantize": quantize, **{f"export {fmt}": export(fmt) for fmt in EXPORTS}, "distill": distill}


def probe(name: str):
    """f(out) -> whether the run of command `name` reached its most fragile point: a first finished quantize block,
    a distillation checkpoint, or an export's temporary under construction."""
    if name == "quantize":
        return lambda out: any((out.parent / f"{out.name}.partial").glob("*.safetensors.json"))
    if name == "distill":
        return lambda out: (out.parent / f"{out.name}.partial" / "train.safetensors").is_file()
    return lambda out: any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


def tree_sha(out: Path) -> dict:
    """relative path -> sha256 of every file under `out` (or of `out` itself when it is a file)."""
    files = [out] if out.is_file() else sorted(p for p in out.rglob("*") if p.is_file())
    return {str(p.relative_to(out)) if p != out else out.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def _differs(got: dict, want: dict) -> list[str]:
    return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k) and Path(k).name not in
                  ALLOWED_TO_DIFFER)


def _leftovers(out: Path) -> list[str]:
    """Temporary files or directories a killed run left beside `out` or inside it (dot-names; the lock file)."""
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}") or p.name == f"{out.name}.lock"
              or p.name == f"{out.name}.partial"]
    inside = [str(p.relative_to(out)) for p in out.rglob(".*")] if out.is_dir() else []
    return sorted(beside + inside)


def state_after_kill(out: Path) -> str:
    """What a killed run left for its rerun: finished quantize blocks, a distillation checkpoint, temporaries."""
    part = out.parent / f"{out.name}.partial"
    bits = []
    if part.is_dir():
        blocks = len(list(part.glob("*.safetensors.json")))
        bits.append(f"partial: {blocks} block{'s' if blocks != 1 else ''}" if blocks else "partial")
        if (part / "teacher.json").is_file():
            bits.append("teacher targets")
        if (part / "train.safetensors").is_file():
            bits.append("train state")
    temps = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    if temps:
        bits.append(f"{len(temps)} temp")
    if out.exists():
        bits.append("final output")
    return ", ".join(bits) or "nothing"


def _writing(where: Path, out: Path, t0: float) -> bool:
    """Whether the run started at `t0` has written under `where` (a file or directory changed since `t0`), its
    lock aside: a partial's state or block, a checkpoint, a temporary output."""
    lock = f"{out.name}.lock"
    for p in where.rglob("*"):
        try:
            if p.name != lock and p.stat().st_mtime >= t0:
                return True
        except FileNotFoundError:  # removed while we looked
            continue
    return False


def _after_writing_starts(where: Path, out: Path, h: dict, delay: float):
    """kill_when for reap(): true `delay` s after the run of handle `h` starts writing (see _writing)."""
    seen: list[float] = []

    def when() -> bool:
        if not seen and _writing(where, out, h["t0"]):
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] >= delay
    return when


def reference(cmd, where: Path) -> tuple[dict, float, float]:
    """The uninterrupted run of `cmd` in `where`: (sha256 of its files, seconds it took, seconds until it started
    writing: see _writing)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    argv, out = cmd(where)
    h, first = spawn(argv), []

    def watch() -> bool:  # never kills: notes when the run starts writing
        if not first and _writing(where, out, h["t0"]):
            first.append(time.time() - h["t0"])
        return False

    r = reap(h, kill_when=watch)
    if r["rc"] != 0:
        raise RuntimeError(f"the uninterrupted run {argv} failed (exit {r['rc']}): {r['err'][-2000:]}")
    return tree_sha(out), r["seconds"], first[0] if first else 0.0


def trial(cmd, where: Path, want: dict, span: tuple, rng: random.Random | None, when=None) -> dict:
    """Kill `cmd` once or twice (the resumed run killed again) at random points of its writing: f × (end - start)
    seconds after the run starts writing, f uniform in 5..95 %, `span` = (start, end) of the reference; or (`when`
    given, rng None) once as soon as `when(out)` holds; then rerun it to the end; how it went."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    argv, out = cmd(where)
    fractions = [] if rng is None else [round(rng.uniform(0.05, 0.95), 4) for _ in range(rng.choice((1, 2)))]
    kills = ["probe"] if rng is None else [round(f * (span[1] - span[0]), 2) for f in fractions]
    notes, left, done_early = [], [], False
    for t in kills:
        h = spawn(argv)
        r = reap(h, kill_when=(lambda: when(out)) if t == "probe" else _after_writing_starts(where, out, h, t))
        if not r["killed"]:  # it finished before the kill (or failed)
            done_early = r["rc"] == 0
            if r["rc"] != 0:
                notes.append(f"exit {r['rc']} before the kill: {r['err'].strip().splitlines()[-1:]}")
            break
        left.append(state_after_kill(out))
        if out.exists():  # killed after its final rename: the output must be whole (a rerun would refuse it)
            if _differs(tree_sha(out), want):
                notes.append(f"after the kill at {t} s the final name holds a partial output")
            done_early = True
            break
    final = {"rc": 0} if done_early else reap(spawn(argv), TIMEOUT)
    if final["rc"] != 0:
        notes.append(f"rerun exit {final['rc']}: {' | '.join(final['err'].strip().splitlines()[-2:])[-300:]}")
    diff = _differs(tree_sha(out), want) if out.exists() else ["(no output)"]
    rest = _leftovers(out)
    stale_lock = done_early and bool(left) and f"{out.name}.lock" in rest  # killed after its rename, before exit
    if stale_lock:  # an inert file (flock dies with the process); the next run on this output takes it and removes it
        rest.remove(f"{out.name}.lock")
    shutil.rmtree(where, ignore_errors=True)
    # finished_before_kill: the output was whole before a kill took effect (no rerun needed, none made)
    return {"kills": kills, "fractions": fractions, "after_kill": left, "finished_before_kill": done_early,
            "rerun_rc": final["rc"], "stale_lock": stale_lock, "identical": not diff, "differs": diff, "leftovers": rest, "notes": notes,
            "ok": not diff and not notes and not rest}


def run_trials(bases: dict, work: Path, n: int, seed: int = 0, names=None, quick: bool = False,
               log=print) -> list[dict]:
    """Per command (or those in `names`): one kill at its most fragile point (probe) and `n` seeded kills at random
    points; one row per command with every trial's result (the probe trial first)."""
    rows = []
    for name, cmd in commands(bases, quick).items():
        if names is not None and name not in names:
            continue
        want, secs, start = reference(cmd, work / "kill_ref")
        rng = random.Random(f"{seed}:{name}")
        trials = []
        for i in range(n + 1):
            t = trial(cmd, work / "kill_trial", want, (start, secs), rng if i else None, when=probe(name))
            trials.append(t)
            log(f"[kill] {name:26s} trial {i}/{n} kills {t['kills']} s into its writing (left {t['after_kill']}): "
                f"{'identical' if t['identical'] else 'DIFFERS ' + str(t['differs'][:3])}"
                f"{' leftovers ' + str(t['leftovers']) if t['leftovers'] else ''}{' ' + str(t['notes']) if t['notes'] else ''}")
        shutil.rmtree(work / "kill_ref", ignore_errors=True)
        rows.append({"command": name, "reference_s": secs, "writes_from_s": start, "files": len(want), "trials": trials})
    return rows
