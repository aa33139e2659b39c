"""The `<out>.partial/` directory that makes long runs resumable: kept only while its inputs are unchanged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm


def partial_dir(out: Path) -> Path:
    """Where the unfinished work for output `out` lives."""
    return out.parent / (out.name + ".partial")


def discard_stale(partial: Path, fingerprint: str) -> None:
    """Remove `partial` unless it was started with the same `fingerprint` (inputs and options)."""
    if not partial.exists():
        return
    try:
        same = json.loads((partial / "state.json").read_text()).get("fingerprint") == fingerprint
    except (OSError, json.JSONDecodeError):
        same = False
    if not same:
        tqdm.write(f"discarding unfinished run in {partial} (different inputs or options); starting clean")
        shutil.rmtree(partial)


def mark(partial: Path, fingerprint: str, options: dict) -> None:
    """Create `partial` (if needed) and record what it belongs to."""
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "state.json").write_text(json.dumps({"fingerprint": fingerprint, "options": options}))
