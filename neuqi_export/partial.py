"""The `<out>.partial/` directory that makes long runs resumable: kept only while its inputs are unchanged."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from .atomic import atomic_file
from .master import GGUFLinear, QuantizedLinear
from .safetensors_io import save_file


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


def save_block(path: Path, records: dict, losses: dict) -> None:
    """One finished block's records and losses, written atomically (a resumed run reads them back)."""
    tensors, types = {}, {}
    for name, lin in records.items():
        if isinstance(lin, GGUFLinear):
            tensors[f"{name}.gguf"] = lin.data
            tensors[f"{name}.hdiag"] = lin.hdiag
            types[name] = lin.qtype
            continue
        tensors[f"{name}.codes"] = lin.codes
        tensors[f"{name}.scales"] = lin.scale
        tensors[f"{name}.zeros"] = lin.zero
        tensors[f"{name}.hdiag"] = lin.hdiag
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"losses": json.dumps(losses), "gguf_types": json.dumps(types)})


def load_block(path: Path, names: list, opts) -> tuple[dict, dict]:
    """The records and losses save_block wrote; opts gives the uniform records' bits and group size."""
    from safetensors import safe_open

    raw = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        losses = json.loads(f.metadata()["losses"])
        types = json.loads(f.metadata().get("gguf_types", "{}"))
    records = {n: GGUFLinear(raw[f"{n}.gguf"], types[n], (raw[f"{n}.gguf"].shape[0], raw[f"{n}.hdiag"].shape[0]),
                             raw[f"{n}.hdiag"])
               if n in types else
               QuantizedLinear(raw[f"{n}.codes"], raw[f"{n}.scales"], raw[f"{n}.zeros"], opts.bits, opts.group_size,
                               raw[f"{n}.hdiag"]) for n in names}
    return records, losses
