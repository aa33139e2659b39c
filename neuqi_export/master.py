"""The master checkpoint: the exact quantized record every exporter reads (DESIGN.md).

A HF-style directory: config.json with a `quantization_config` block, the tokenizer files, and safetensors
shards with an index (master_store.py: one shard per block, then one for the rest; a master written before issue 21
has one `model.safetensors`) holding, per quantized linear `<m>`: `<m>.qweight` (codes as a little-endian
bit stream along the input dimension, uint8 (out, ceil(in*bits/8))), `<m>.scales` and `<m>.zeros`
(float32 (out, n_groups)), `<m>.hdiag` (float32 (in,), the damped diag(H) the parameters were fitted
with; ones when no calibration); every other tensor as it was. A quantized output head is `lm_head` like any
linear; when the model ties it to the embedding (`quantization_config.lm_head.tied_embedding`), the embedding
table is not stored: it is that head's dequantized matrix.
A linear quantized directly for a GGUF block type (`convert --to gguf`'s K-quant-aware mode) is stored
instead as `<m>.gguf` (the blocks as llama.cpp reads them, uint8 (out, row_bytes); F16/F32 rows as floats)
with its type in the module entry; only the GGUF exporter and the dequantizing runtimes take those. The core reads
no block format: converters.gguf registers how its types' rows are sized and dequantized (register_blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch

from .atomic import atomic_directory
from .bitpack import pack_bits, unpack_bits
from .errors import UserError
from .master_store import TOKENIZER_FILES  # noqa: F401 - where the exporters look it up
from .quant.grid import dequantize, n_groups

QUANT_METHOD = "neuqi"
HEAD, EMBED = "lm_head", "model.embed_tokens.weight"  # the output head and the (possibly tied) embedding table
WEIGHTS_NAME = "model.safetensors"


@dataclass
class QuantizedLinear:
    """One quantized linear: dequant = scale * (codes - zero), per group of input columns."""

    kind: ClassVar[str] = "uniform"  # the grid kind it was quantized on (grids.py); exporters check it
    codes: torch.Tensor  # uint8 (out, in), values 0 .. 2**bits - 1
    scale: torch.Tensor  # float32 (out, n_groups)
    zero: torch.Tensor  # float32 (out, n_groups), float zero-point
    bits: int
    group_size: int  # -1 = per-channel
    hdiag: torch.Tensor | None = None  # float32 (in,)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    @property
    def effective_group_size(self) -> int:
        return self.codes.shape[1] if self.group_size == -1 else self.group_size

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) weights this record stands for."""
        return dequantize(self.codes, self.scale, self.zero, self.effective_group_size)

    def validate(self, name: str) -> None:
        out, inp = self.shape
        ng = n_groups(inp, self.effective_group_size)
        if tuple(self.scale.shape) != (out, ng) or tuple(self.zero.shape) != (out, ng):
            raise UserError(f"{name}: scales/zeros shape {tuple(self.scale.shape)} does not match {(out, ng)}; the checkpoint is corrupt, re-run quantize")
        if self.codes.numel() and int(self.codes.max()) >= (1 << self.bits):
            raise UserError(f"{name}: codes exceed {self.bits} bits; the checkpoint is corrupt, re-run quantize")

    def to_tensors(self, name: str) -> tuple[dict, dict]:
        """The tensors this record is stored as (codes bit-packed) and its `quantization_config.modules` entry."""
        return ({f"{name}.qweight": torch.from_numpy(pack_bits(self.codes.cpu().numpy(), self.bits)),
                 f"{name}.scales": self.scale.float().cpu().contiguous(),
                 f"{name}.zeros": self.zero.float().cpu().contiguous(), f"{name}.hdiag": _hdiag(self.hdiag, self.shape)},
                self.layout())

    def layout(self) -> dict:
        """Its `quantization_config.modules` entry: bits, group size, shape."""
        return {"bits": self.bits, "group_size": self.group_size, "shape": list(self.shape)}


class BlockFormat(Protocol):
    """How a record kind's block types are laid out and read back (registered by the package that defines them)."""

    def row_bytes(self, qtype: str, n: int) -> int:
        """Bytes of one row of n weights in block type `qtype`."""
        ...

    def dequantize(self, data: np.ndarray, qtype: str) -> np.ndarray:
        """float32 (rows, n) weights that the uint8 (rows, row_bytes) blocks of `qtype` stand for."""
        ...


_BLOCKS: dict[str, BlockFormat] = {}


def register_blocks(kind: str, fmt: BlockFormat) -> None:
    """Make records of `kind` (e.g. 'gguf', by converters.gguf) readable: their row sizes and dequantization."""
    _BLOCKS[kind] = fmt


def blocks(kind: str) -> BlockFormat:
    """The registered block format of record kind `kind`; UserError naming the package that registers it."""
    if kind not in _BLOCKS:
        raise UserError(f"this master holds linears in {kind} block types, which only converters.{kind} reads; "
                        f"import converters.{kind} first (the neuqi-export command does)")
    return _BLOCKS[kind]


@dataclass
class GGUFLinear:
    """One linear held in a GGUF block type: dequant = the blocks read as llama.cpp does (blocks("gguf"), from
    converters.gguf: gguf.quants.dequantize(data, qtype))."""

    kind: ClassVar[str] = "gguf"  # the grid kind it was quantized on (grids.py); exporters check it
    data: torch.Tensor  # uint8 (out, row_bytes); F16/F32: the float rows (out, in)
    qtype: str  # GGML type name
    shape: tuple[int, int]
    hdiag: torch.Tensor | None = None  # float32 (in,)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) weights as llama.cpp reads them."""
        if self.qtype in ("F16", "F32"):
            return self.data.float().reshape(self.shape)
        deq = blocks(self.kind).dequantize(self.data.cpu().numpy(), self.qtype)
        return torch.from_numpy(np.ascontiguousarray(deq, np.float32)).reshape(self.shape)

    def validate(self, name: str) -> None:
        out, inp = self.shape
        want = (out, inp if self.qtype in ("F16", "F32") else blocks(self.kind).row_bytes(self.qtype, inp))
        if tuple(self.data.shape) != want:
            raise UserError(f"{name}: {self.qtype} blocks of shape {tuple(self.data.shape)} do not match {want}; the checkpoint is corrupt, re-run convert")

    def to_tensors(self, name: str) -> tuple[dict, dict]:
        """The tensors this record is stored as (the GGUF blocks as they are) and its `modules` entry."""
        return ({f"{name}.gguf": self.data.cpu().contiguous(), f"{name}.hdiag": _hdiag(self.hdiag, self.shape)},
                self.layout())

    def layout(self) -> dict:
        """Its `quantization_config.modules` entry: GGUF type, shape."""
        return {"gguf_type": self.qtype, "shape": list(self.shape)}


def _hdiag(hdiag: torch.Tensor | None, shape) -> torch.Tensor:
    """The stored diag(H) of a record (ones when it had none)."""
    return (hdiag if hdiag is not None else torch.ones(shape[1])).float().cpu().contiguous()


@dataclass
class MasterCheckpoint:
    """config (HF config dict incl. quantization_config), quantized linears, other tensors."""

    config: dict
    linears: dict[str, QuantizedLinear | GGUFLinear] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    tokenizer_dir: Path | None = None  # where the tokenizer files live (copied on save)

    @property
    def quantization_config(self) -> dict:
        return self.config["quantization_config"]

    @property
    def linear_modules(self) -> list[str] | None:
        """Names of every nn.Linear of the transformers model, in its module order, as quantize recorded them
        (None for a master written before they were recorded)."""
        return self.config.get("quantization_config", {}).get("linear_modules")

    @property
    def head_shares_embedding(self) -> bool:
        """True when the output head is quantized and tied: the embedding table is that one quantized matrix, not
        written; load() puts its dequantized copy in `tensors`."""
        if not self.config.get("quantization_config", {}).get("lm_head", {}).get("tied_embedding") \
                or HEAD not in self.linears:
            return False
        return self.record_class(HEAD) is QuantizedLinear

    def record_class(self, name: str) -> type:
        """The record class of linear `name` (a lazily loaded master's linear is not read to tell)."""
        return self.linears.kind(name) if hasattr(self.linears, "kind") else type(self.linears[name])

    def layout(self, name: str) -> dict:
        """Linear `name`'s `modules` entry (bits, group_size, shape; or gguf_type, shape): a lazily loaded master's
        from its config, the linear not read (an exporter asking every linear's bits reads no codes)."""
        known = self.linears.layout(name) if hasattr(self.linears, "layout") else None
        return known if known is not None else self.linears[name].layout()

    @property
    def head_is_embedding(self) -> bool:
        """The output head is the embedding table: tied in the config, or no head stored (float or quantized)."""
        return bool(self.config.get("tie_word_embeddings", False)) or (
            "lm_head.weight" not in self.tensors and HEAD not in self.linears)

    def require_uniform(self, what: str) -> None:
        """UserError when a linear is held in a GGUF block type (only the GGUF exporter can take those)."""
        typed = [n for n in self.linears if self.record_class(n) is GGUFLinear]
        if typed:
            raise UserError(f"this master holds {len(typed)} linears quantized for GGUF block types (e.g. {typed[0]}), "
                            f"which {what} cannot take; export it with --to gguf, or quantize a uniform master with "
                            f"`neuqi-export quantize`")

    def dequantized_state_dict(self, dtype=torch.float32) -> dict[str, torch.Tensor]:
        """A plain state dict (module.weight for every quantized linear) for a transformers model."""
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.tensors.items()}
        for name, lin in self.linears.items():
            sd[f"{name}.weight"] = lin.dequantize().to(dtype)
        return sd

    def save(self, path, overwrite: bool = False) -> Path:
        """Write atomically: build in a temp dir beside `path`, then rename."""
        with atomic_directory(path, overwrite) as tmp:
            self._write(tmp)
        return path

    def _write(self, directory: Path) -> None:
        """One shard per block then one for the rest (master_store.py), each read from this master and written
        before the next is read: a loaded (lazy) master is rewritten without holding it whole."""
        from .master_store import finish, groups, shard_name, write_shard

        skip = EMBED if self.head_shares_embedding else None
        parts = groups(list(self.linears), [k for k in self.tensors if k != skip])
        modules, shards = {}, []
        for i, (lin_names, tensor_names) in enumerate(parts, 1):
            shards.append(shard_name(i, len(parts)))
            modules.update(write_shard(directory / shards[-1], {n: self.linears[n] for n in lin_names},
                                       {k: self.tensors[k] for k in tensor_names}))
        config = dict(self.config)
        config["quantization_config"] = {**self.quantization_config, "quant_method": QUANT_METHOD, "modules": modules}
        finish(directory, config, shards, self.tokenizer_dir)

    @classmethod
    def load(cls, path) -> "MasterCheckpoint":
        """The master checkpoint at `path` (sharded, or one model.safetensors), its tensors read from the shards
        only when asked for (master_store.LazyDict); UserError naming it if it is not one or is damaged."""
        from .file_checks import read_json
        from .master_store import is_master_dir

        path = Path(path)
        if not is_master_dir(path):
            raise UserError(f"'{path}' is not a neuqi-export master checkpoint (needs config.json and {WEIGHTS_NAME} "
                            "or its shards with an index); create one with `neuqi-export quantize`")
        config = read_json(path / "config.json", "re-run `neuqi-export quantize` to recreate the checkpoint")
        qcfg = config.get("quantization_config", {})
        if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD:
            raise UserError(f"'{path}' is not a neuqi-export master checkpoint (quant_method={qcfg.get('quant_method')!r}); create one with `neuqi-export quantize`")
        try:
            return cls._load(path, config, qcfg)
        except UserError as exc:
            if str(path) in str(exc):
                raise
            raise UserError(f"master checkpoint '{path}': {exc}") from None
        except Exception as exc:  # noqa: BLE001 - config and weights that do not fit each other, whatever the type
            raise UserError(f"master checkpoint '{path}' is damaged: its config.json and weights do not fit "
                            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}); "
                            "re-run `neuqi-export quantize`") from None

    @classmethod
    def _load(cls, path: Path, config: dict, qcfg: dict) -> "MasterCheckpoint":
        """load()'s reading of the shards' headers (tensors stay on disk until asked for)."""
        from .master_store import LazyDict, TensorStore

        fix = "re-run `neuqi-export quantize` to recreate the checkpoint"
        modules = qcfg.get("modules", {})
        if not isinstance(modules, dict):
            raise UserError(f"'{path / 'config.json'}' has no quantization_config.modules map; {fix}")
        for name, meta in modules.items():
            if "gguf_type" not in meta and (meta["bits"] not in (2, 3, 4, 8) or not isinstance(meta["group_size"], int)
                                            or meta["group_size"] == 0 or meta["group_size"] < -1):
                raise UserError(f"'{path / 'config.json'}': module {name} has bits={meta['bits']!r}, "
                                f"group_size={meta['group_size']!r}; {fix}")
        store = TensorStore(path)
        parts = set()
        for name, meta in modules.items():
            parts.update(_check_stored(store, name, meta))
        record = ("qweight", "scales", "zeros", "hdiag", "gguf")  # a linear's own tensors (its bias is a tensor)
        extra = sorted(k for k in store.keys() if k.rsplit(".", 1)[-1] in record and k not in parts)
        if extra:
            raise UserError(f"'{path}' holds '{extra[0]}', which its config.json does not describe; {fix}")
        linears = LazyDict(modules, lambda n: _read_linear(store, n, modules[n]),
                           kinds={n: GGUFLinear if "gguf_type" in m else QuantizedLinear for n, m in modules.items()},
                           layouts=modules)
        names = [k for k in store.keys() if k not in parts]
        master = cls(config=config, linears=linears, tensors=LazyDict(names, store.get), tokenizer_dir=path)
        if master.head_shares_embedding:
            master.tensors = LazyDict([*names, EMBED],
                                      lambda k: linears[HEAD].dequantize() if k == EMBED else store.get(k))
        return master


def _stored_shapes(name: str, meta: dict) -> dict:
    """The tensors (name -> shape) a `modules` entry says the master holds for linear `name`."""
    out, inp = meta["shape"]
    if "gguf_type" in meta:
        qtype = meta["gguf_type"]
        row = inp if qtype in ("F16", "F32") else blocks(GGUFLinear.kind).row_bytes(qtype, inp)
        return {f"{name}.gguf": (out, row), f"{name}.hdiag": (inp,)}
    ng = n_groups(inp, inp if meta["group_size"] == -1 else meta["group_size"])
    return {f"{name}.qweight": (out, (inp * meta["bits"] + 7) // 8), f"{name}.scales": (out, ng),
            f"{name}.zeros": (out, ng), f"{name}.hdiag": (inp,)}


def _check_stored(store, name: str, meta: dict) -> list[str]:
    """The tensor names of linear `name`, checked present with the shapes its entry gives (read from the
    headers); UserError otherwise."""
    want = _stored_shapes(name, meta)
    for k, shape in want.items():
        if k not in store:
            raise UserError(f"{name}: tensor '{k}' is missing from the master; the checkpoint is corrupt, re-run quantize")
        if store.shape(k) != tuple(shape):
            raise UserError(f"{name}: '{k}' has shape {store.shape(k)}, not {tuple(shape)}; the checkpoint is corrupt, "
                            "re-run quantize")
    return list(want)


def _read_linear(store, name: str, meta: dict):
    """Linear `name` read from the master's shards."""
    out, inp = meta["shape"]
    if "gguf_type" in meta:
        lin = GGUFLinear(store.get(f"{name}.gguf"), meta["gguf_type"], (out, inp), store.get(f"{name}.hdiag"))
    else:
        codes = unpack_bits(store.get(f"{name}.qweight").numpy(), meta["bits"], inp)
        lin = QuantizedLinear(codes=torch.from_numpy(np.ascontiguousarray(codes)).reshape(out, inp),
                              scale=store.get(f"{name}.scales"), zero=store.get(f"{name}.zeros"), bits=meta["bits"],
                              group_size=meta["group_size"], hdiag=store.get(f"{name}.hdiag"))
    lin.validate(name)
    return lin
