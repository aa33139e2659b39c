"""Full disks and concurrent runs (issue 23): the CLI with every write capped (RLIMIT_FSIZE in a forked child: EFBIG,
as on a full disk) must end in one line, exit 2, nothing under the final name and no temp left; two runs started on
one output must end with one finished (its output equal to a clean run's) and the other refused in one line."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from .bases import Q, digest
from .runner import reap, spawn

DISK_CAP = 256 << 10  # bytes any one file may grow to
FORMATS = ("gguf", "onnx", "compressed-tensors", "mlx")


def _lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def disk_full(argv: list, out: Path, name: str | None = None) -> dict:
    """Run `argv` (writing `out`) with writes capped at DISK_CAP; ok when it ends in one 'no space left' line,
    exit 2, with nothing under the final name and no temp beside it."""
    r = reap(spawn([str(a) for a in argv], fsize=DISK_CAP))
    err = _lines(r["err"])
    temps = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] if out.parent.exists() else []
    ok = r["rc"] == 2 and len(err) == 1 and "no space left" in err[0] and not out.exists() and not temps
    how = (err[-1][:240] if err else "") + ("" if not temps else f" (temps left: {temps})") + \
        ("" if not out.exists() else " (output left under the final name)")
    return {"name": name or " ".join(str(a) for a in argv[:4]), "ok": ok, "rc": r["rc"], "lines": len(err), "how": how,
            "seconds": r["seconds"]}


def disk_full_runs(bases: dict, where: Path) -> list[dict]:
    """disk_full() for `export --to` each format and for `quantize`."""
    rows = []
    for fmt in FORMATS:
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        out = where / f"out_{fmt}"
        rows.append(disk_full(["export", bases["master"], "--to", fmt, "-o", out, "--quiet"], out,
                              f"export MASTER --to {fmt}"))
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    out = where / "q"
    rows.append(disk_full(["quantize", bases["hf"], "-o", out, "--no-calib", "--group-size", "32", "--quiet"], out,
                          "quantize HF --no-calib"))
    shutil.rmtree(where, ignore_errors=True)
    return rows


def concurrent(argv_of, out: Path, want: str | None, name: str, delay: float = 0.5) -> dict:
    """Start argv_of(out) twice, the second `delay` s after the first; ok when exactly one exits 0 (its output's
    digest equal to `want` when given) and the other exits 2 with one line saying another run holds the output."""
    argv = [str(a) for a in argv_of(out)]
    first = spawn(argv)
    time.sleep(delay)
    second = spawn(argv)
    r1, r2 = reap(first), reap(second)
    rcs = sorted((r1["rc"], r2["rc"]))
    loser = r2 if r2["rc"] == 2 else r1
    err = _lines(loser["err"])
    same = out.exists() and (want is None or digest(out) == want)
    ok = rcs == [0, 2] and len(err) == 1 and "another neuqi-export run" in err[0] and same
    return {"name": name, "ok": ok, "rc": f"{r1['rc']}, {r2['rc']}",
            "lines": len(err), "how": (err[0][:240] if err else "") + ("" if same else " (output differs / missing)"),
            "seconds": max(r1["seconds"], r2["seconds"])}


def concurrency_runs(bases: dict, where: Path, clean: dict) -> list[dict]:
    """concurrent() for quantize (output compared with the clean run's) and for export --to gguf."""
    rows = []
    for argv_of, name, want, what in [
        (lambda o: ["quantize", bases["hf"], "-o", o, "--calib", bases["calib"], *Q], "out", clean.get("quantize"),
         "quantize HF --calib TEXT, twice on one -o"),
        (lambda o: ["export", bases["master"], "--to", "gguf", "-o", o, "--quiet"], "out.gguf", None,
         "export MASTER --to gguf, twice on one -o"),
    ]:
        shutil.rmtree(where, ignore_errors=True)
        where.mkdir(parents=True)
        rows.append(concurrent(argv_of, where / name, want, what))
    shutil.rmtree(where, ignore_errors=True)
    return rows
