"""Wall time per stage of a run (loading, calibration forwards, Hessians, fits, GPTQ, writing, export).

Stages nest: entering one pauses the stage around it, so each second is charged to exactly one stage (the
innermost running) and the stages add up to the timed wall time. A Hessian accumulated inside a block's
forward (a hook) is therefore charged to "hessian", not to "forward".
"""
from __future__ import annotations

import time
from contextlib import contextmanager

# the order a report lists them in; other names follow in the order first seen
STAGES = ("load", "calibration forward", "hessian", "fit", "gptq", "pack", "loss", "resume", "write", "export")


class StageTimer:
    """Exclusive wall seconds per stage name; `stage(name)` is a re-entrant context manager."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._since = time.perf_counter()
        self._start = self._since

    def _charge(self, now: float) -> None:
        if self._stack:
            top = self._stack[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + (now - self._since)
        self._since = now

    @contextmanager
    def stage(self, name: str):
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def total(self) -> float:
        """Wall seconds since the timer was made."""
        return time.perf_counter() - self._start

    def ordered(self) -> dict[str, float]:
        """{stage: seconds} in report order, plus 'other' for the untimed rest of the wall time."""
        out = {k: self.seconds[k] for k in STAGES if k in self.seconds}
        out.update({k: v for k, v in self.seconds.items() if k not in out})
        out["other"] = max(0.0, self.total() - sum(self.seconds.values()))
        return out

    def report(self) -> str:
        """One line: 'time: load 1.2 s (3%), ... ; total 40.1 s'."""
        total = self.total()
        parts = [f"{k} {v:.1f} s ({100 * v / total:.0f}%)" for k, v in self.ordered().items() if v >= 0.05]
        return "time: " + ", ".join(parts) + f"; total {total:.1f} s"
