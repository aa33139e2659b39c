"""Replay, within one block's calibration, the outputs of sub-modules that can no longer change.

A block is run once per linear subset (each Hessian is collected with the earlier subsets quantized) and once
more for its outputs. Most of each pass recomputes what the pass before already computed with the same
weights on the same inputs: once q/k/v are quantized, their outputs are final; once o is too, the whole
attention module's output is final; and so on. So a unit (a linear of the subsets, or a direct child of the
block that holds some of them) is recorded, per window, in the first pass after its last linear was
quantized, and returned from memory in the later passes instead of being recomputed. On SmolLM2 this cuts the
block forwards' work about in half.

The result is bit-identical to recomputing: a replayed output is the very tensor that computation gave, and
in the first pass that replays a unit its first window is also recomputed and compared bit for bit (a unit
whose input still changes, e.g. a family whose subsets are not in execution order, fails the check and is
simply recomputed from then on). Outputs are copied on record and on replay, so in-place ops downstream can
touch neither. Records are kept only within `budget_bytes` (a unit that would exceed it is not recorded).
"""
from __future__ import annotations

import os

import torch


def default_budget(device) -> int:
    """Bytes of recorded outputs allowed: a quarter of the free memory where they are kept (RAM or the GPU)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] // 4
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 30


def _copy(out):
    if torch.is_tensor(out):
        return out.detach().clone()
    if isinstance(out, tuple):
        return tuple(_copy(o) for o in out)
    if isinstance(out, list):
        return [_copy(o) for o in out]
    return out


def _nbytes(out) -> int:
    if torch.is_tensor(out):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _equal(a, b) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype and \
            torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class BlockReplay:
    """Records and replays final sub-module outputs across one block's calibration passes (see module doc).

    Use: `begin_pass(done, last)` before each pass (done = subsets quantized so far; last: no later pass will
    replay, so nothing is recorded), set `window` to the window's index before each block call, `end_pass()`
    after the pass, `close()` when the block is finished."""

    def __init__(self, block, subsets: list[list[str]], n_windows: int, budget_bytes: int):
        self.block, self.n, self.budget = block, n_windows, budget_bytes
        self.window = 0
        last: dict[str, int] = {}
        for i, subset in enumerate(subsets):
            for name in subset:
                last[name] = i
                parent = name.split(".")[0]
                if parent != name:
                    last[parent] = max(last.get(parent, -1), i)
        self.last = last  # unit path -> the subset whose quantization makes it final
        self.records: dict[str, dict[int, object]] = {}
        self.broken: set[str] = set()  # failed the bit-for-bit check, or over the budget: always recomputed
        self.verified: set[str] = set()
        self._handles: list = []
        self._patched: list = []
        self.used = 0

    def _module(self, path: str):
        obj = self.block
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def _complete(self, path: str) -> bool:
        return len(self.records.get(path, ())) == self.n

    def begin_pass(self, done: int, last: bool = False) -> None:
        final = [p for p, i in self.last.items() if i < done and p not in self.broken]
        replayed = {p for p in final if self._complete(p)}
        for p in list(self.records):  # a unit inside a replayed one is never called again
            if any(p.startswith(q + ".") for q in replayed):
                self._drop(p)
        replayed = {p for p in replayed if p in self.records}
        for p in replayed:
            self._patch(p)
        if last:
            return
        new = [p for p in final if p not in self.records and p not in replayed]
        for p in new:  # not inside a unit that is replayed, or recorded itself in this pass
            if not any(p.startswith(q + ".") for q in replayed | set(new)):
                self.records[p] = {}
                self._handles.append(self._module(p).register_forward_hook(self._recorder(p)))

    def _recorder(self, path: str):
        def hook(module, args, output):
            rec = self.records.get(path)
            if rec is None:
                return
            size = _nbytes(output)
            if self.used + size > self.budget:
                self._drop(path)
                self.broken.add(path)
                return
            rec[self.window] = _copy(output)
            self.used += size
        return hook

    def _patch(self, path: str) -> None:
        module = self._module(path)
        real = module.forward
        rec = self.records[path]

        def replay(*args, **kwargs):
            if path not in self.verified:  # the first replayed window is recomputed and compared bit for bit
                if not _equal(real(*args, **kwargs), rec[self.window]):
                    self.broken.add(path)
                    del module.forward
                    self._patched.remove(module)
                    self._drop(path)
                    return real(*args, **kwargs)
                self.verified.add(path)
            return _copy(rec[self.window])

        module.forward = replay
        self._patched.append(module)

    def _drop(self, path: str) -> None:
        rec = self.records.pop(path, None)
        if rec:
            self.used -= sum(_nbytes(v) for v in rec.values())

    def end_pass(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for m in self._patched:
            del m.forward
        self._patched = []
        for p in [p for p in self.records if not self._complete(p)]:  # a pass stopped before the unit ran
            self._drop(p)

    def close(self) -> None:
        self.end_pass()
        self.records.clear()
        self.used = 0
