"""Checks of the files the toolkit reads, before anything is parsed or allocated (issue 23: broken and hostile inputs).

Each check reads only headers, compares every size a header claims with the file's real size, and raises a
one-line UserError naming the file and what to do; the readers call one of them first.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import UserError

# safetensors dtype -> bytes per element
_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
             "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def read_json(path, fix: str) -> dict:
    """The JSON object in `path`; UserError (naming it and `fix`) when it is unreadable, not JSON or not an object."""
    p = Path(path)
    try:
        obj = json.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise UserError(f"'{p}' does not exist; {fix}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"'{p}' is not valid JSON ({str(exc).splitlines()[0][:120]}); {fix}") from None
    if not isinstance(obj, dict):
        raise UserError(f"'{p}' holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def safetensors_header(path, fix: str = "re-download it") -> dict:
    """The header of safetensors file `path`, every tensor's dtype, shape and byte range checked against the
    file's size; UserError naming the file for a truncated, corrupt or hostile one."""
    p = Path(path)
    bad = f"safetensors file '{p}' is truncated or corrupt"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{bad} ({size} bytes, shorter than a header); {fix}")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, _MAX_HEADER):
                raise UserError(f"{bad} (its header claims {n} bytes, the file has {size}); {fix}")
            header = json.loads(f.read(n).decode("utf-8"))
    except UserError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{bad} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]}); {fix}") from None
    if not isinstance(header, dict):
        raise UserError(f"{bad} (header is not a JSON object); {fix}")
    body = size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            if not isinstance(e, dict) or not all(isinstance(v, str) for v in e.values()):
                raise UserError(f"{bad} (its metadata is not a string map); {fix}")
            continue
        try:
            dtype, shape, (a, z) = e["dtype"], e["shape"], e["data_offsets"]
            ok = (dtype in _ST_BYTES and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(a, int) and isinstance(z, int) and 0 <= a <= z <= body
                  and z - a == math.prod(shape) * _ST_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise UserError(f"{bad} (tensor '{name}': {str(e)[:120]} does not fit the file's {body} data bytes); {fix}")
    return header


def hf_weights(model_dir, config: dict) -> None:
    """Check a HF directory's safetensors shards (and index) and that config.json's sizes fit the weights: a
    config that claims a model far bigger than its files (or one missing its sizes) is refused before any
    allocation."""
    root = Path(model_dir)
    cfg = root / "config.json"
    fix = "restore the model's config.json"
    if not isinstance(config.get("model_type"), str):
        raise UserError(f"'{cfg}' has no model_type string; {fix}")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    dims = {}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        v = text.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise UserError(f"'{cfg}' has {key}={v!r}; it must be a positive integer ({fix})")
        dims[key] = v
    index = root / "model.safetensors.index.json"
    files = sorted(root.glob("*.safetensors"))
    if index.is_file():
        wm = read_json(index, "re-download the model's model.safetensors.index.json").get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise UserError(f"'{index}' has no weight_map of tensor -> shard file; re-download it")
        names = {}
        for shard in sorted(set(wm.values())):
            f = root / shard
            if Path(shard).name != shard or not f.is_file():
                raise UserError(f"shard '{shard}' named in '{index}' is missing from {root}; download it")
            names[shard] = set(safetensors_header(f)) - {"__metadata__"}
        for t, shard in wm.items():
            if t not in names[shard]:
                raise UserError(f"'{index}' places tensor '{t}' in '{shard}', which does not hold it; "
                                "re-download the index and shards of one revision")
        files = [root / s for s in names]
    else:
        for f in files:
            safetensors_header(f)
    if not files:
        return  # *.bin weights: transformers' weights_only loader checks those
    total = sum(f.stat().st_size for f in files)
    # a lower bound on the parameters: the embedding plus q and o projections of every layer
    claimed = dims["vocab_size"] * dims["hidden_size"] + 2 * dims["num_hidden_layers"] * dims["hidden_size"] ** 2
    if claimed > total:  # at least one byte a parameter
        raise UserError(f"'{cfg}' describes a model of at least {claimed:.3g} parameters but its weights hold {total} "
                        f"bytes; the config and weights do not belong together ({fix})")


def gguf_header(path, fix: str = "re-export it") -> None:
    """Check a GGUF file's magic, version and the counts its header claims against its size (a hostile count
    is refused before anything is read), then every tensor's data range; UserError naming the file."""
    p = Path(path)
    bad = f"GGUF file '{p}' is truncated or corrupt"
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError as exc:
        raise UserError(f"cannot read GGUF file '{p}' ({exc}); {fix}") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise UserError(f"'{p}' is not a GGUF file (magic {head[:4]!r}, {size} bytes); {fix}")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise UserError(f"{bad} (version {version}; llama.cpp reads 2 and 3); {fix}")
    # each tensor info takes at least 8+4+8+4+8 bytes, each key/value at least 8+1+4 bytes
    if n_tensors * 32 + n_kv * 13 > size:
        raise UserError(f"{bad} (its header claims {n_tensors} tensors and {n_kv} keys in {size} bytes); {fix}")
    try:
        import gguf

        reader = gguf.GGUFReader(str(p))
        tensors = list(reader.tensors)
    except Exception as exc:  # noqa: BLE001 - any parse failure of a damaged file means the same to the user
        raise UserError(f"{bad} ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); "
                        f"{fix}") from None
    for t in tensors:
        if t.data_offset + int(t.n_bytes) > size:
            raise UserError(f"{bad} (tensor '{t.name}' ends past the file's {size} bytes); {fix}")


def finite_tensors(tensors: dict, path, fix: str) -> None:
    """UserError naming the first floating tensor of `tensors` (read from `path`) that holds NaN or Inf."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(f"tensor '{name}' in '{path}' contains NaN/Inf; {fix}")
