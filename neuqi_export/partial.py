"""The `<out>.partial/` directory that makes long runs resumable: kept only while its inputs are unchanged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_file
from .master_store import full_disk_is_user_error, write_shard


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


def save_block(partial: Path, shard: str, records: dict, others: dict, losses: dict) -> dict:
    """One finished block as the master shard `shard` (its records and its other tensors) in `partial`, then its
    losses and `modules` entries beside it (`<shard>.json`, written last: the block counts as done once it exists);
    returns the `modules` entries."""
    modules = write_shard(partial / shard, records, others)
    with full_disk_is_user_error(partial), atomic_file(partial / f"{shard}.json") as tmp:
        tmp.write_text(json.dumps({"losses": losses, "modules": modules}))  # losses in order: sums match
    return modules


def block_done(partial: Path, shard: str) -> bool:
    """Whether save_block finished writing `shard`."""
    return (partial / shard).is_file() and (partial / f"{shard}.json").is_file()


def load_block(partial: Path, shard: str) -> tuple[dict, dict, dict]:
    """The records, losses and `modules` entries save_block wrote for `shard` (a damaged block file is one
    UserError naming it)."""
    from .errors import UserError
    from .file_checks import finite_tensors, safetensors_header

    path = partial / shard
    fix = f"delete '{path}' (or the whole '{partial}') and rerun to recompute it"
    safetensors_header(path, fix)
    try:
        records, losses, modules = _load_block(partial, shard)
        for n, rec in records.items():
            finite_tensors({f"{n}.{k}": getattr(rec, k) for k in ("scale", "zero", "hdiag", "data")
                            if getattr(rec, k, None) is not None}, path, fix)
    except UserError as exc:
        raise UserError(f"unfinished block '{path}' is damaged ({exc}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - any damage means the same to the user
        raise UserError(f"unfinished block '{path}' is damaged ({type(exc).__name__}: {str(exc)[:100]}); {fix}") from None
    return records, losses, modules


def _load_block(partial: Path, shard: str) -> tuple[dict, dict, dict]:
    from .master import _read_linear
    from .master_store import TensorStore

    info = json.loads((partial / f"{shard}.json").read_text())
    store = TensorStore(partial, [partial / shard])
    records = {n: _read_linear(store, n, meta) for n, meta in info["modules"].items()}
    return records, info["losses"], info["modules"]
