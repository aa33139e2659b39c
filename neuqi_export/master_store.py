"""The master's files (issue 21): safetensors shards with an index as HF writes them, one shard per block and a last
one for everything else, written a shard at a time; read back lazily, each tensor from its shard when asked for.

Layout: `model-0000i-of-0000n.safetensors` (shard i = block i-1, shard n = embedding, final norm, head) and
`model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map": {tensor: shard}}). A master written before
(one `model.safetensors`) reads the same way.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path

import torch

from .atomic import atomic_file
from .errors import UserError
from .safetensors_io import read_header, write_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_METADATA = {"format": "pt", "neuqi_export": "master-2"}
TOKENIZER_FILES = (  # copied beside a master (and every export that carries a tokenizer)
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
_BLOCK = re.compile(r"^(.*?\.(\d+))\.")


def shard_name(i: int, n: int) -> str:
    """HF's name of shard i (1-based) of n."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def block_of(name: str) -> tuple[str, int] | None:
    """(block prefix, index) of a tensor or module name inside a numbered block ('model.layers.3.mlp.up_proj' ->
    ('model.layers.3', 3)); None outside the blocks."""
    m = _BLOCK.match(name)
    return (m.group(1), int(m.group(2))) if m else None


def weight_files(path) -> list[Path]:
    """The weight files of the master at `path` (its shards, or its one model.safetensors); [] when none."""
    path = Path(path)
    if (path / INDEX_NAME).is_file():
        return [path / f for f in sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))]
    return [path / SINGLE_NAME] if (path / SINGLE_NAME).is_file() else []


def is_master_dir(path) -> bool:
    """Whether `path` holds a master's config and weights (sharded or one file)."""
    return (Path(path) / "config.json").is_file() and bool(weight_files(path))


@contextmanager
def full_disk_is_user_error(where: Path):
    """A full disk while writing under `where` ends in one line (UserError), not a traceback."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"no space left on the device holding '{where}' ({exc.strerror}); free space there (or write "
                        "elsewhere with -o) and re-run the same command") from None


def write_shard(path: Path, records: dict, others: dict) -> dict:
    """Write quantized `records` and plain tensors `others` as one shard (atomically); returns the records'
    `modules` entries."""
    tensors, modules = {}, {}
    for name, lin in records.items():
        lin.validate(name)
        t, modules[name] = lin.to_tensors(name)
        tensors.update(t)
    for k, v in others.items():
        tensors[k] = v.detach().cpu().contiguous()
    with full_disk_is_user_error(path.parent), atomic_file(path) as tmp:
        write_file(tensors, tmp, metadata=SHARD_METADATA)
    return modules


def finish(directory: Path, config: dict, shards: list[str], tokenizer_dir) -> None:
    """Write the index of `shards` (already in `directory`), config.json and the tokenizer files."""
    weight_map, total = {}, 0
    for f in shards:
        for k, v in read_header(directory / f).items():
            if k != "__metadata__":
                weight_map[k] = f
                total += v["data_offsets"][1] - v["data_offsets"][0]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with full_disk_is_user_error(directory):
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, directory / fname)


def groups(linears, tensors) -> list[tuple[list, list]]:
    """(linear names, tensor names) per shard: one group per block in block order, then the rest."""
    by: dict = {}
    for kind, names in ((0, linears), (1, tensors)):
        for n in names:
            b = block_of(n)
            by.setdefault((0, b[0].rsplit(".", 1)[0], b[1]) if b else (1, "", 0), ([], []))[kind].append(n)
    return [by[k] for k in sorted(by)]


class TensorStore:
    """tensor name -> its shard, and each tensor read from it (in its stored dtype) on request."""

    def __init__(self, root: Path, files: list | None = None):
        """The master at `root`, or only the safetensors `files` (paths) in it; every header checked against its
        file's size first (file_checks.safetensors_header: one line naming a truncated, corrupt or hostile shard),
        and for a sharded master each shard's tensors against its index: a tensor the index does not list (an
        unknown tensor) or one it places elsewhere is refused in one line naming the shard and the tensor."""
        from .file_checks import read_json, safetensors_header

        fix = "re-run `neuqi-export quantize` to recreate the checkpoint"
        self.root = Path(root)
        self.where: dict[str, str] = {}
        self.info: dict[str, dict] = {}
        listed = None
        if files is None and (self.root / INDEX_NAME).is_file():
            listed = read_json(self.root / INDEX_NAME, fix).get("weight_map")
            if not isinstance(listed, dict):
                raise UserError(f"'{self.root / INDEX_NAME}' has no weight_map of tensor -> shard file; {fix}")
        for f in weight_files(self.root) if files is None else [Path(f) for f in files]:
            if not f.is_file():
                raise UserError(f"master shard '{f}' is missing{' (its index lists it)' if listed is not None else ''}; "
                                f"restore it from a copy of the checkpoint or {fix}")
            header = safetensors_header(f, fix)
            for k, v in header.items():
                if k != "__metadata__":
                    if listed is not None and listed.get(k) != f.name:
                        raise UserError(f"master shard '{f}' holds tensor '{k}', which its index "
                                        f"{'places in ' + repr(listed[k]) if k in listed else 'does not list'}; {fix}")
                    self.where[k], self.info[k] = f.name, v
        if listed is not None:
            gone = sorted(set(listed) - set(self.where))
            if gone:
                raise UserError(f"master shard '{self.root / listed[gone[0]]}' lacks tensor '{gone[0]}', which its "
                                f"index lists; {fix}")

    def __contains__(self, name) -> bool:
        return name in self.where

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple:
        return tuple(self.info[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` exactly as stored; UserError naming its shard when it holds NaN/Inf (the lazy master's
        finiteness check, tensor by tensor as it is read)."""
        from safetensors import safe_open

        from .file_checks import finite_tensors

        shard = self.where[name]
        # a handle per read: one kept open keeps every page read through its map resident (in the RSS) to the end
        t = safe_open(str(self.root / shard), framework="pt").get_tensor(name)
        finite_tensors({name: t}, self.root / shard, "re-run `neuqi-export quantize` to recreate the checkpoint")
        return t


class LazyDict(MutableMapping):
    """A mapping whose values are read (`read(name)`) only when asked for and not kept; writes and deletions are
    kept on top. `kinds` (name -> class) says a value's type without reading it."""

    def __init__(self, names, read, kinds: dict | None = None, layouts: dict | None = None):
        self._names = list(names)
        self._known = set(self._names)
        self._read, self._kinds, self._layouts = read, kinds or {}, layouts or {}
        self._over: dict = {}
        self._gone: set = set()

    def kind(self, name):
        return type(self._over[name]) if name in self._over else self._kinds.get(name)

    def layout(self, name) -> dict | None:
        """What the stored value's `layouts` entry says of it (None once it is replaced or unknown)."""
        return None if name in self._over else self._layouts.get(name)

    def __getitem__(self, name):
        if name in self._over:
            return self._over[name]
        if name not in self._known or name in self._gone:
            raise KeyError(name)
        return self._read(name)

    def __setitem__(self, name, value):
        self._over[name] = value
        self._gone.discard(name)

    def __delitem__(self, name):
        if name not in self:
            raise KeyError(name)
        self._over.pop(name, None)
        if name in self._known:
            self._gone.add(name)

    def __contains__(self, name) -> bool:
        return name in self._over or (name in self._known and name not in self._gone)

    def __iter__(self):
        yield from (n for n in self._names if n not in self._gone and n not in self._over)
        yield from self._over

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"LazyDict({len(self)} entries)"


def tensor_digests(path) -> dict[str, str]:
    """sha256 of every stored tensor's bytes in the master at `path`, whatever its layout (tests and tools
    compare masters with it)."""
    import hashlib

    out = {}
    for f in weight_files(path):
        header = read_header(f)
        with open(f, "rb") as fh:
            base = 8 + int.from_bytes(fh.read(8), "little")
            for k, v in header.items():
                if k != "__metadata__":
                    a, b = v["data_offsets"]
                    fh.seek(base + a)
                    out[k] = hashlib.sha256(fh.read(b - a) + json.dumps([v["dtype"], v["shape"]]).encode()).hexdigest()
    return out


def assemble(tmp: Path, partial: Path, n_shards: int, records: dict, others: dict, config: dict, tokenizer_dir) -> None:
    """The finished master, written into `tmp` (the caller's atomic_directory, renamed to the output once the caller
    has added its last files): the block shards already in `partial` (linked, not moved: a run killed here still
    finds its blocks there), a last shard of `records` and `others`, the index, `config` (its
    quantization_config.modules completed with the last shard's records) and the tokenizer files."""
    shards = [shard_name(i, n_shards) for i in range(1, n_shards + 1)]
    for f in shards[:-1]:
        _link(partial / f, tmp / f)
    config["quantization_config"]["modules"].update(write_shard(tmp / shards[-1], records, others))
    finish(tmp, config, shards, tokenizer_dir)


def _link(src: Path, dst: Path) -> None:
    """dst as a hard link to src (a copy where the file system has no links)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
