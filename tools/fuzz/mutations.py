"""The ways the fuzz cases break a copy of a real file: truncations, flipped bytes, safetensors header edits (dtype,
shape, offsets, hostile sizes, NaN/Inf, missing and extra tensors), JSON edits, GGUF and .dat count patches. Each
maker returns f(path_of_target, base_dir, bases) -> None, which rewrites the file in place; all are seeded."""
from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path


def truncate(frac: float):
    def f(p: Path, *_):
        data = p.read_bytes()
        p.write_bytes(data[:int(len(data) * frac)])
    f.__name__ = f"truncate@{frac:g}"
    return f


def truncate_at(n: int):
    def f(p: Path, *_):
        p.write_bytes(p.read_bytes()[:n])
    return f


def flip(seed: int, lo: int, hi: int, count: int = 4):
    """Flip `count` seeded bytes in [lo, hi) (hi < 0: from the end; clipped to the file)."""
    def f(p: Path, *_):
        data = bytearray(p.read_bytes())
        rng = random.Random(seed)
        top = min(len(data), hi if hi > 0 else len(data) + hi)
        for _ in range(count):
            i = rng.randrange(lo, top)
            data[i] ^= 0xFF
        p.write_bytes(bytes(data))
    return f


def st_header(p: Path) -> tuple[dict, bytes]:
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def st_write(p: Path, header: dict, body: bytes) -> None:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    p.write_bytes(struct.pack("<Q", len(h)) + h + body)


def st_edit(fn):
    """Edit a safetensors header dict in place (fn(header) -> None)."""
    def f(p: Path, *_):
        h, body = st_header(p)
        fn(h)
        st_write(p, h, body)
    return f


def _first(h: dict, suffix: str) -> str:
    return next(k for k in sorted(h) if k != "__metadata__" and k.endswith(suffix))


def st_dtype(suffix: str, dtype: str):
    return st_edit(lambda h: h[_first(h, suffix)].__setitem__("dtype", dtype))


def st_shape(suffix: str, fn):
    return st_edit(lambda h: h[_first(h, suffix)].__setitem__("shape", fn(h[_first(h, suffix)]["shape"])))


def st_drop(suffix: str):
    return st_edit(lambda h: h.pop(_first(h, suffix)))


def st_hostile_len(p: Path, *_):
    raw = p.read_bytes()
    p.write_bytes(struct.pack("<Q", 1 << 42) + raw[8:])  # a 4 TB header


def st_hostile_shape(suffix: str):
    """A tensor whose shape claims terabytes (offsets unchanged)."""
    return st_shape(suffix, lambda s: [1 << 20, 1 << 20])


def st_offsets_past_end(suffix: str):
    def fn(h):
        e = h[_first(h, suffix)]
        a, z = e["data_offsets"]
        e["data_offsets"] = [a + (1 << 40), z + (1 << 40)]
    return st_edit(fn)


def st_values(suffix: str, value: float):
    """Put `value` (NaN/Inf) in the first element of a float tensor (header untouched)."""
    def f(p: Path, *_):
        raw = bytearray(p.read_bytes())
        h, _ = st_header(p)
        n = struct.unpack("<Q", raw[:8])[0]
        e = h[_first(h, suffix)]
        off = 8 + n + e["data_offsets"][0]
        fmt = {"F32": "<f", "F16": "<e", "BF16": None}[e["dtype"]]
        raw[off:off + struct.calcsize(fmt)] = struct.pack(fmt, value)
        p.write_bytes(bytes(raw))
    return f


def st_extra(p: Path, *_):
    h, body = st_header(p)
    h["model.extra_junk.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [len(body), len(body) + 8]}
    st_write(p, h, body + b"\0" * 8)


def json_edit(fn):
    def f(p: Path, *_):
        d = json.loads(p.read_text())
        fn(d)
        p.write_text(json.dumps(d))
    return f


def write(content: bytes):
    def f(p: Path, *_):
        p.write_bytes(content)
    return f


def remove(p: Path, *_):
    p.unlink()


def other_shard(p: Path, base: Path, bases: dict):
    shutil.copy2(next(bases["other"].glob("*.safetensors")), p)


def gguf_patch(field: str, value: int):
    """Overwrite a GGUF header count: 'tensors' (bytes 8..16), 'kvs' (16..24) or the first key's length (24..32)."""
    at = {"tensors": 8, "kvs": 16, "keylen": 24}[field]

    def f(p: Path, *_):
        raw = bytearray(p.read_bytes())
        raw[at:at + 8] = struct.pack("<Q", value)
        p.write_bytes(bytes(raw))
    return f


def dat_patch(at: int, value: int):
    """Overwrite a 4-byte int of a legacy .dat imatrix (0: entry count, 4: first name length)."""
    def f(p: Path, *_):
        raw = bytearray(p.read_bytes())
        raw[at:at + 4] = struct.pack("<i", value)
        p.write_bytes(bytes(raw))
    return f


def patch_bytes(p: Path, at: int, data: bytes) -> None:
    """Overwrite the bytes of `p` at `at` with `data`."""
    raw = bytearray(p.read_bytes())
    raw[at:at + len(data)] = data
    p.write_bytes(bytes(raw))


def move_first_tensor(d: dict) -> None:
    """Point an index's first tensor at another shard."""
    wm = d["weight_map"]
    k = sorted(wm)[0]
    wm[k] = next(v for v in sorted(set(wm.values())) if v != wm[k])


def first_module(d: dict) -> dict:
    """The first `quantization_config.modules` entry of a master config."""
    mods = d["quantization_config"]["modules"]
    return mods[sorted(mods)[0]]


def dat_nan(p: Path, *_):
    """Put NaN in the first value of a legacy .dat imatrix."""
    raw = bytearray(p.read_bytes())
    n = struct.unpack("<i", raw[4:8])[0]
    at = 8 + n + 8  # name, ncall, nval, then the values
    raw[at:at + 4] = struct.pack("<f", float("nan"))
    p.write_bytes(bytes(raw))
