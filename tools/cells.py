"""The cached cell of the comparison tools: one measured result, a JSON object in a file under a work directory.

A tool names each cell by a key; `Cells(root, suffix).get(key, compute)` returns the JSON in
`root / f"{key}{suffix}.json"` when that file exists and computes, writes and returns it otherwise, so an
interrupted run resumes at the first missing cell. The file is written all-or-nothing (a temp file beside it,
then a rename: neuqi_export.atomic.atomic_file), so an interruption never leaves half a cell.

A cell file that does not parse as a JSON object (e.g. cut short by an interrupted write of a tool version that
wrote in place) is reported on stderr and recomputed: its content is lost anyway, and recomputing is what a
missing cell gets. A cell that parses but was measured on something else is the tool's to judge: `check`
sees every hit and may raise (tools/onnx_compare.py stops when the token ids differ).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

from neuqi_export.atomic import atomic_file


class Cells:
    """Cells cached as `root / f"{key}{suffix}.json"`.

    indent: json.dumps' indent for the written file (None: one line).
    show: what is printed (with the key) after a cell is computed, from its result (default: the result).
    check: called as check(path, result) on every cache hit; may raise to refuse the cell.
    """

    def __init__(self, root, suffix: str = "", *, indent: int | None = None,
                 show: Callable[[dict], Any] | None = None, check: Callable[[Path, dict], None] | None = None):
        self.root = Path(root)
        self.suffix = suffix
        self.indent = indent
        self.show = show
        self.check = check

    def path(self, key: str) -> Path:
        return self.root / f"{key}{self.suffix}.json"

    def load(self, key: str) -> dict | None:
        """The cached result, or None when the cell is missing or its file is not a JSON object (reported)."""
        f = self.path(key)
        if not f.is_file():
            return None
        try:
            res = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as exc:  # json.JSONDecodeError is a ValueError
            print(f"cells: {f} is not valid JSON ({exc}); recomputing it", file=sys.stderr, flush=True)
            return None
        if not isinstance(res, dict):
            print(f"cells: {f} holds a {type(res).__name__}, not a JSON object; recomputing it", file=sys.stderr,
                  flush=True)
            return None
        return res

    def get(self, key: str, compute: Callable[[], dict] | None) -> dict | None:
        """The cell's result: from its file, else compute() written to it (compute=None: None on a miss)."""
        res = self.load(key)
        if res is not None:
            if self.check is not None:
                self.check(self.path(key), res)
            return res
        if compute is None:
            return None
        res = compute()
        self.save(key, res)
        print(key, res if self.show is None else self.show(res), flush=True)
        return res

    def save(self, key: str, res: dict) -> Path:
        f = self.path(key)
        with atomic_file(f) as tmp:
            tmp.write_text(json.dumps(res, indent=self.indent))
        return f
