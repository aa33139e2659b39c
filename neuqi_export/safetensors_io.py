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




# The library's dtype order (its Rust `Dtype` enum, which sorts the tensors in a file: larger first, then by name).
_DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
                "I64", "U64")
_TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
                 "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
                 "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64"}


def _st_dtype(t) -> str:
    name = str(t.dtype).removeprefix("torch.")
    for k, v in _TORCH_DTYPES.items():
        if v == name:
            return k
    raise ValueError(f"safetensors has no dtype for {t.dtype}")


def _write_bytes(f, buf) -> None:
    """One write of the streaming writer (a test replaces it to simulate a full disk)."""
    f.write(buf)


def write_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """The file safetensors' `save_file` writes (same bytes, `__metadata__` keys sorted), streamed: the header,
    then each tensor's bytes in turn, so nothing but the tensors themselves is held. Not atomic: callers write a
    temp name (atomic.py)."""
    import torch

    order = sorted(tensors, key=lambda n: (-_DTYPE_ORDER.index(_st_dtype(tensors[n])), n))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _st_dtype(t), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = _dump(header)
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as f:
        _write_bytes(f, len(raw).to_bytes(8, "little"))
        _write_bytes(f, raw)
        for name in order:
            t = tensors[name].detach()
            if t.numel():
                t = t.cpu().contiguous().reshape(-1)
                _write_bytes(f, memoryview((t.view(torch.uint8) if t.dtype != torch.uint8 else t).numpy()))


def read_header(path) -> dict:
    """The JSON header of safetensors file `path` (name -> dtype, shape, data_offsets; `__metadata__`)."""
    with open(Path(path), "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError(f"header length {n} is not plausible")
        return json.loads(f.read(n))


__all__ = ["read_header", "save_file", "sort_metadata", "write_file"]
