"""`neuqi-export quantize --nproc N`: start N processes of the same command on this machine with the environment
torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), and watch them: the first one that
fails stops the others, in one line naming it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError


def without_nproc(argv: list[str]) -> list[str]:
    """argv less its --nproc option (`--nproc N` or `--nproc=N`)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(rank: int, nproc: int, port: int) -> dict:
    """The environment of local worker `rank` of `nproc` (torchrun's variables; threads split between them unless
    OMP_NUM_THREADS is set)."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(nproc), RANK=str(rank),
               LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _why(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with code {rc}"


def _last_error(log: Path) -> str | None:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("neuqi-export: error:")]
    except OSError:
        return None
    return lines[-1] if lines else None


def _stop(procs: list) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(argv: list[str], nproc: int, output: str | None, module: str = "neuqi_export") -> int:
    """Run `python -m <module> <argv without --nproc>` as ranks 0..nproc-1 and return the exit code: 0 when all
    succeed; else the first failure stops the others and is reported (rank 0 writes to this terminal, the others to
    log files whose last error line is repeated here)."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc} is not a process count; pass 1 or more")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc inside a torchrun (or --nproc) launch: drop --nproc, torchrun already started the "
                        "processes")
    port, args = _free_port(), without_nproc(argv)
    procs, logs = [], []
    with tempfile.TemporaryDirectory(prefix="neuqi-ranks-") as tmp:
        try:
            for r in range(nproc):
                log = Path(tmp) / f"rank{r}.log"
                logs.append(log)
                sink = None if r == 0 else open(log, "wb")  # noqa: SIM115 - closed with the process
                procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=worker_env(r, nproc, port),
                                              stdout=sink or None, stderr=sink or None))
                if sink:
                    sink.close()
            while True:
                codes = [p.poll() for p in procs]
                failed = [(r, rc) for r, rc in enumerate(codes) if rc not in (None, 0)]
                if failed:
                    r, rc = min(failed, key=lambda f: (f[1] == 2, f[0]))  # a crash is the cause
                    _stop(procs)
                    if rc == 2 and r > 0 and _last_error(logs[r]):  # its own one-line error (bad input, ...)
                        print(_last_error(logs[r]).replace("error:", f"error: rank {r}:", 1), file=sys.stderr)
                    elif rc != 2:
                        kept = f"; finished blocks stay in {output}.partial: rerun the same command to resume" \
                            if output else ""
                        print(f"neuqi-export: error: rank {r} of {nproc} {_why(rc)}; stopped the other "
                              f"{nproc - 1}{kept}", file=sys.stderr)
                    return 2 if rc == 2 else 1
                if all(rc == 0 for rc in codes):
                    return 0
                time.sleep(0.05)
        except KeyboardInterrupt:
            _stop(procs)
            print("neuqi-export: interrupted; re-run the same command to resume from the last finished block",
                  file=sys.stderr)
            return 130
        finally:
            _stop(procs)
