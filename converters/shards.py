"""Safetensors exports as Hugging Face shards them (issue 21): `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {tensor: shard}}), or one
`model.safetensors` without an index when everything fits in one shard, as `save_pretrained` writes them.

The rule is huggingface_hub's `split_state_dict_into_shards`: tensors in the order given, a new shard when the next
tensor would take the current one past `max_shard_size`; a tensor larger than that is a shard of its own, numbered
where it comes, the current shard left open. The writer writes each shard as soon as it is complete and drops its
tensors, so at most one shard is held at a time.
`--max-shard-size` (default 5GB, HF's) is one option for every format that writes these.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from neuqi_export.errors import UserError

DEFAULT_MAX_SHARD_SIZE = "5GB"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or a plain integer (decimal units as HF reads them); UserError
    naming --max-shard-size otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).upper() not in _UNITS:
            raise UserError(f"--max-shard-size {value!r} is not a size; write it as 5GB, 500MB, 2GiB or a number of bytes")
        n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise UserError(f"--max-shard-size {value!r} must be positive; the default is {DEFAULT_MAX_SHARD_SIZE}")
    return n


def shard_name(i: int, n: int) -> str:
    """HF's name of shard i (1-based) of n."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """add(name, tensor) in order, then finish(): the shards (and index) in `directory` (the caller's temp dir)."""

    def __init__(self, directory, max_shard_size=DEFAULT_MAX_SHARD_SIZE, metadata: dict | None = None):
        self.dir = Path(directory)
        self.max = parse_size(max_shard_size)
        self.metadata = metadata
        self._cur: dict = {}
        self._cur_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temp file, its tensor names)
        self.total = 0

    def add(self, name: str, tensor) -> None:
        """Put `tensor` in the current shard (writing that one first when `tensor` would take it past the limit);
        a tensor larger than the limit is written at once as a shard of its own, the current one left open."""
        if name in self._cur or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        self.total += nbytes
        if nbytes > self.max:
            self._write({name: tensor.contiguous()})
            return
        if self._cur and self._cur_bytes + nbytes > self.max:
            self._flush()
        self._cur[name] = tensor.contiguous()
        self._cur_bytes += nbytes

    def _flush(self) -> None:
        self._write(self._cur)
        self._cur, self._cur_bytes = {}, 0

    def _write(self, tensors: dict) -> None:
        """`tensors` as the next shard, under a temporary name until finish()."""
        from neuqi_export.safetensors_io import save_file

        path = self.dir / f".shard-{len(self._written) + 1}.tmp"
        save_file(tensors, str(path), metadata=self.metadata)
        self._written.append((path, list(tensors)))

    def finish(self) -> list[str]:
        """Write the last shard, give every shard its final name, write the index when there are several; returns
        the shard file names."""
        if self._cur or not self._written:
            self._flush()
        n = len(self._written)
        names = [SINGLE_NAME] if n == 1 else [shard_name(i, n) for i in range(1, n + 1)]
        weight_map = {}
        for (tmp, tensors), final in zip(self._written, names):
            tmp.rename(self.dir / final)
            weight_map.update(dict.fromkeys(tensors, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names


def write_tensors(directory, tensors, max_shard_size=DEFAULT_MAX_SHARD_SIZE, metadata: dict | None = None) -> list[str]:
    """Every tensor of `tensors` into shards in `directory` (ShardWriter); returns the shard file names. `tensors` is
    a dict (in its order, each dropped from it once written into a shard) or an iterable of (name, tensor) pairs
    (an exporter's generator makes each block's tensors only when the previous ones are placed)."""
    w = ShardWriter(directory, max_shard_size, metadata)
    if isinstance(tensors, dict):
        for name in list(tensors):
            w.add(name, tensors.pop(name))
    else:
        for name, tensor in tensors:
            w.add(name, tensor)
    return w.finish()


def by_block(names, blocks_path: str) -> list[list[str]]:
    """`names` (module or tensor names) grouped to be made and written a group at a time: each block's
    (`<blocks_path>.<i>.`) in block order, then those outside the blocks (embedding, final norm, head)."""
    pat = re.compile(rf"^{re.escape(blocks_path)}\.(\d+)\.")
    groups: dict[int, list[str]] = {}
    for n in names:
        m = pat.match(n)
        groups.setdefault(int(m.group(1)) if m else -1, []).append(n)
    return [groups[k] for k in sorted(groups, key=lambda k: (k < 0, k))]


def add_option(p: argparse.ArgumentParser) -> None:
    """--max-shard-size, once per parser (every sharded format shares it)."""
    if "--max-shard-size" not in getattr(p, "_option_string_actions", {}):
        p.add_argument("--max-shard-size", dest="max_shard_size", default=DEFAULT_MAX_SHARD_SIZE,
                       help="mlx / compressed-tensors: largest safetensors shard, e.g. 5GB (default, as Hugging Face "
                            "writes them), 500MB; a bigger model is written as model-0000i-of-0000N.safetensors "
                            "with model.safetensors.index.json")
