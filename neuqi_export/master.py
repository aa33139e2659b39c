"""The master checkpoint: the exact quantized record every exporter reads (DESIGN.md).

A HF-style directory: config.json with a `quantization_config` block, the tokenizer files, and
`model.safetensors` holding, per quantized linear `<m>`: `<m>.qweight` (codes as a little-endian
bit stream along the input dimension, uint8 (out, ceil(in*bits/8))), `<m>.scales` and `<m>.zeros`
(float32 (out, n_groups)), `<m>.hdiag` (float32 (in,), the damped diag(H) the parameters were fitted
with; ones when no calibration); every other tensor as it was. A quantized output head is `lm_head` like any
linear; when the model ties it to the embedding (`quantization_config.lm_head.tied_embedding`), the embedding
table is not stored: it is that head's dequantized matrix.
A linear quantized directly for a GGUF block type (`convert --to gguf`'s K-quant-aware mode) is stored
instead as `<m>.gguf` (the blocks as llama.cpp reads them, uint8 (out, row_bytes); F16/F32 rows as floats)
with its type in the module entry; only the GGUF exporter and the dequantizing runtimes take those.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .atomic import atomic_directory
from .bitpack import pack_bits, unpack_bits
from .errors import UserError
from .quant.grid import dequantize, n_groups
from .safetensors_io import save_file

QUANT_METHOD = "neuqi"
HEAD, EMBED = "lm_head", "model.embed_tokens.weight"  # the output head and the (possibly tied) embedding table
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)


@dataclass
class QuantizedLinear:
    """One quantized linear: dequant = scale * (codes - zero), per group of input columns."""

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


@dataclass
class GGUFLinear:
    """One linear held in a GGUF block type: dequant = gguf.quants.dequantize(data, qtype)."""

    data: torch.Tensor  # uint8 (out, row_bytes); F16/F32: the float rows (out, in)
    qtype: str  # GGML type name
    shape: tuple[int, int]
    hdiag: torch.Tensor | None = None  # float32 (in,)

    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) weights as llama.cpp reads them."""
        import gguf

        if self.qtype in ("F16", "F32"):
            return self.data.float().reshape(self.shape)
        deq = gguf.quants.dequantize(self.data.cpu().numpy(), gguf.GGMLQuantizationType[self.qtype])
        return torch.from_numpy(np.ascontiguousarray(deq, np.float32)).reshape(self.shape)

    def validate(self, name: str) -> None:
        import gguf

        out, inp = self.shape
        if self.qtype not in ("F16", "F32"):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.qtype]]
            want = (out, inp // block * size)
        else:
            want = (out, inp)
        if tuple(self.data.shape) != want:
            raise UserError(f"{name}: {self.qtype} blocks of shape {tuple(self.data.shape)} do not match {want}; the checkpoint is corrupt, re-run convert")


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
    def head_shares_embedding(self) -> bool:
        """True when the output head is quantized and tied: the embedding table is that one quantized matrix, not
        written; load() puts its dequantized copy in `tensors`."""
        return bool(self.config.get("quantization_config", {}).get("lm_head", {}).get("tied_embedding")) \
            and isinstance(self.linears.get(HEAD), QuantizedLinear)

    def require_uniform(self, what: str) -> None:
        """UserError when a linear is held in a GGUF block type (only the GGUF exporter can take those)."""
        typed = [n for n, lin in self.linears.items() if isinstance(lin, GGUFLinear)]
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
        tensors = {}
        modules = {}
        for name, lin in self.linears.items():
            lin.validate(name)
            h = lin.hdiag if lin.hdiag is not None else torch.ones(lin.shape[1])
            if isinstance(lin, GGUFLinear):
                tensors[f"{name}.gguf"] = lin.data.cpu().contiguous()
                tensors[f"{name}.hdiag"] = h.float().cpu().contiguous()
                modules[name] = {"gguf_type": lin.qtype, "shape": list(lin.shape)}
                continue
            tensors[f"{name}.qweight"] = torch.from_numpy(pack_bits(lin.codes.cpu().numpy(), lin.bits))
            tensors[f"{name}.scales"] = lin.scale.float().cpu().contiguous()
            tensors[f"{name}.zeros"] = lin.zero.float().cpu().contiguous()
            tensors[f"{name}.hdiag"] = h.float().cpu().contiguous()
            modules[name] = {"bits": lin.bits, "group_size": lin.group_size, "shape": list(lin.shape)}
        for k, v in self.tensors.items():
            if k == EMBED and self.head_shares_embedding:
                continue
            tensors[k] = v.detach().cpu().contiguous().clone()
        config = dict(self.config)
        config["quantization_config"] = {**self.quantization_config, "quant_method": QUANT_METHOD, "modules": modules}
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "neuqi_export": "master-1"})
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(self.tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, directory / fname)

    @classmethod
    def load(cls, path) -> "MasterCheckpoint":
        """Read a master checkpoint written by save(); UserError if it is not one."""
        path = Path(path)
        cfg_path, weights = path / "config.json", path / WEIGHTS_NAME
        if not cfg_path.is_file() or not weights.is_file():
            raise UserError(f"'{path}' is not a neuqi-export master checkpoint (needs config.json and {WEIGHTS_NAME}); create one with `neuqi-export quantize`")
        config = json.loads(cfg_path.read_text())
        qcfg = config.get("quantization_config", {})
        if qcfg.get("quant_method") != QUANT_METHOD:
            raise UserError(f"'{path}' is not a neuqi-export master checkpoint (quant_method={qcfg.get('quant_method')!r}); create one with `neuqi-export quantize`")
        raw = load_file(str(weights))
        linears = {}
        for name, meta in qcfg.get("modules", {}).items():
            out, inp = meta["shape"]
            if "gguf_type" in meta:
                linears[name] = GGUFLinear(raw.pop(f"{name}.gguf"), meta["gguf_type"], (out, inp), raw.pop(f"{name}.hdiag"))
                linears[name].validate(name)
                continue
            codes = unpack_bits(raw.pop(f"{name}.qweight").numpy(), meta["bits"], inp)
            linears[name] = QuantizedLinear(
                codes=torch.from_numpy(np.ascontiguousarray(codes)).reshape(out, inp),
                scale=raw.pop(f"{name}.scales"), zero=raw.pop(f"{name}.zeros"),
                bits=meta["bits"], group_size=meta["group_size"], hdiag=raw.pop(f"{name}.hdiag"),
            )
            linears[name].validate(name)
        master = cls(config=config, linears=linears, tensors=raw, tokenizer_dir=path)
        if master.head_shares_embedding:
            raw[EMBED] = linears[HEAD].dequantize()
        return master
