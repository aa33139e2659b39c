"""Byte-reproducible safetensors files: the library's `save_file`, then the header's metadata in sorted order.

safetensors (0.8) writes `__metadata__` in the iteration order of a Rust HashMap, which differs from one call to
the next (safetensors/safetensors#584, open), so two saves of the same tensors with two or more metadata keys
can differ in their bytes and checksums. `save_file` lets the library write the file, then rewrites that JSON
object with its keys sorted: the same keys and values, so the header keeps its length and every tensor offset
stays valid. Written here because the library has no option for it; the check below leaves any header it
could not reproduce exactly (other than that order) untouched.
"""
from __future__ import annotations

import json
from pathlib import Path


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, with the same bytes for the same tensors and metadata on every call."""
    from safetensors.torch import save_file as _save

    _save(tensors, str(path), metadata=metadata)
    if metadata and len(metadata) > 1:
        sort_metadata(path)


def sort_metadata(path) -> bool:
    """Rewrite the header of the safetensors file `path` in place with `__metadata__`'s keys sorted. Returns
    whether it rewrote it (False: no metadata, already sorted, or a header this JSON encoder does not
    reproduce byte for byte, which is then left as it is)."""
    with open(Path(path), "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        body = raw.rstrip(b" ")
        header = json.loads(body)
        meta = header.get("__metadata__")
        if not meta or list(meta) == sorted(meta):
            return False
        if _dump(header) != body:  # not the library's own encoding: leave it
            return False
        header["__metadata__"] = dict(sorted(meta.items()))
        new = _dump(header)
        assert len(new) == len(body)  # same keys and values in another order
        f.seek(8)
        f.write(new)
    return True


def _dump(header: dict) -> bytes:
    """The header as safetensors' serde_json writes it: compact, UTF-8, keys in the order given."""
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


__all__ = ["save_file", "sort_metadata"]
