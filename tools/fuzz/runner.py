"""Running one fuzz case: copy its base, break the target, run the real CLI in a forked child of this preloaded
interpreter (its address space capped, killed after a timeout, optionally its writes capped as on a full disk),
and classify how it ended."""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from .bases import digest
from .cases import Case

MEM_LIMIT = 4 << 30
TIMEOUT = 120


def prepare(case: Case, bases: dict, where: Path) -> tuple[Path, list, Path | None, Path]:
    """Copy the case's base into `where`, break its target; (case dir, argv, output path, broken file)."""
    if where.exists():
        shutil.rmtree(where)
    where.mkdir(parents=True)
    if case.base == "calibdir":
        base = where / "calibdir"
        base.mkdir()
        (base / "calib.txt").write_bytes(b"")
    else:
        base = where / case.base
        shutil.copytree(bases[case.base], base)
    target = base / case.target
    if case.target == "@data":
        target = next(p for p in base.iterdir() if p.name != "model.onnx" and p.stat().st_size > 100_000)
    case.mutate(target, base, bases)
    argv, out = case.argv(where, base, bases)
    return where, argv, out, target


def preload() -> None:
    """Import what the CLI needs once, so each forked case starts in milliseconds."""
    import llama_cpp  # noqa: F401
    import onnxruntime  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import neuqi_export.cli  # noqa: F401
    import neuqi_export.pipeline  # noqa: F401
    torch.set_num_threads(1)


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def spawn(argv: list, limit: int = MEM_LIMIT, fsize: int | None = None) -> dict:
    """Start the CLI on `argv` in a forked child of this (preloaded) interpreter, its address space limited to what
    the parent holds plus `limit` (and its writes to `fsize` bytes, as on a full disk); a handle for reap()."""
    import resource
    import tempfile
    import traceback

    errf = tempfile.TemporaryFile()
    sys.stderr.flush()
    sys.stdout.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        rc = 1
        try:
            os.dup2(errf.fileno(), 2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            sys.stderr = open(2, "w", closefd=False, buffering=1)  # also when the parent's sys.stderr is captured
            sys.stdout = open(1, "w", closefd=False)
            cap = _vm_size() + limit
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            if fsize is not None:  # a full disk: a write past `fsize` bytes fails with EFBIG (SIGXFSZ ignored)
                import signal

                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            from neuqi_export.cli import main

            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            rc = 1
        finally:
            sys.stderr.flush()
            os._exit(rc)
    return {"pid": pid, "errf": errf, "t0": t0}


def reap(h: dict, timeout: float = TIMEOUT, kill_after: float | None = None, kill_when=None) -> dict:
    """Wait for the child of spawn(); SIGKILL it after `timeout` s (rc 124), or (rc -9, killed True) at
    `kill_after` seconds after its start or as soon as `kill_when()` holds (polled every 5 ms); rc, stderr,
    seconds, peak MB."""
    pid, t0 = h["pid"], h["t0"]
    status, usage, cut = 0, None, None
    while True:
        got, status, usage = os.wait4(pid, os.WNOHANG)
        if got:
            break
        dt = time.time() - t0
        cut = "timeout" if dt > timeout else "kill" if (kill_after is not None and dt > kill_after) or \
            (kill_when is not None and kill_when()) else None
        if cut:
            os.kill(pid, 9)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    h["errf"].seek(0)
    err = h["errf"].read().decode(errors="replace")
    h["errf"].close()
    killed = cut == "kill"
    rc = -9 if killed else 124 if cut else os.waitstatus_to_exitcode(status)
    return {"rc": rc, "err": err, "seconds": time.time() - t0, "peak_mb": usage.ru_maxrss / 1024, "killed": killed}


def run_forked(argv: list, limit: int = MEM_LIMIT, timeout: float = TIMEOUT, fsize: int | None = None) -> dict:
    """Run the CLI on `argv` in a forked child (spawn), killed after `timeout`; rc (124 = timeout), stderr,
    seconds, peak MB."""
    return reap(spawn(argv, limit, fsize), timeout)


def run_inprocess(argv: list) -> dict:
    """Run the CLI on `argv` in this interpreter, stderr captured (for the quick cases of the CI test)."""
    import contextlib
    import io

    from neuqi_export.cli import main

    buf, t0 = io.StringIO(), time.time()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            import traceback

            traceback.print_exc(file=buf)
            rc = 1
    return {"rc": rc, "err": buf.getvalue(), "seconds": time.time() - t0, "peak_mb": float("nan")}


def classify(case: Case, res: dict, out: Path | None, target: Path, clean: dict) -> tuple[bool, str]:
    """(ok, how it ended) for a finished case."""
    lines = [ln for ln in res["err"].splitlines() if ln.strip()]
    names = {str(target), str(target.parent)}  # the broken file, or the directory (model, master) holding it
    if case.accept and res["rc"] == 0:
        want = clean.get(case.accept)
        same = out is not None and out.exists() and want is not None and digest(out) == want
        how = "recomputed the damaged cache" if case.kind in ("partial", "distill-state") else "accepted"
        return same, f"{how}: exit 0, output equals a clean run's" if same else \
            "exit 0 but the output differs from a clean run's"
    if res["rc"] == 124:
        return False, "timeout"
    if res["rc"] != 2:
        return False, f"exit {res['rc']}: " + " | ".join(lines[-3:])[-400:]
    if len(lines) != 1:
        return False, f"exit 2 with {len(lines)} lines: " + " | ".join(lines[-3:])[-400:]
    if out is not None and out.exists():
        return False, "exit 2 but output left under the final name"
    if not any(n and n in lines[0] for n in names):
        return False, f"exit 2, line does not name the file: {lines[0][:300]}"
    return True, lines[0][:300]


def run_case(case: Case, bases: dict, where: Path, clean: dict, inprocess: bool = False) -> dict:
    """Prepare, run and classify one case."""
    d, argv, out, target = prepare(case, bases, where)
    res = run_inprocess(argv) if inprocess else run_forked(argv)
    ok, how = classify(case, res, out, target, clean)
    shutil.rmtree(d, ignore_errors=True)
    return dict(kind=case.kind, name=case.name, ok=ok, how=how, seconds=res["seconds"], peak_mb=res["peak_mb"])
