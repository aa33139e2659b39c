"""A model whose weights stay on disk until a part of it is needed (issue 21: models bigger than the RAM).

`LazyModel.open(model_dir)` builds the transformers skeleton with every parameter on the meta device (accelerate's
`init_empty_weights`, buffers such as rotary tables real) and maps each tensor name to its safetensors shard
(`model.safetensors.index.json`, or the keys of every `*.safetensors` file). `materialize(module)` reads that
module's tensors from their shards (memory-mapped, one at a time) as float32 — the dtype the in-memory path
loads, so results are the same bytes — and `release(module)` puts them back on meta.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UserError

INDEX = "model.safetensors.index.json"


@dataclass
class ShardMap:
    """tensor name -> shard file of a safetensors checkpoint. A shard is opened for each read and closed after it:
    a handle kept open keeps every page read through its memory map resident (counted in the RSS) for the whole run."""

    root: Path
    where: dict = field(default_factory=dict)

    @classmethod
    def of(cls, model_dir) -> ShardMap:
        """The map of `model_dir`'s safetensors weights; UserError for a missing, truncated or corrupt shard."""
        root = Path(model_dir)
        m = cls(root)
        index = root / INDEX
        if index.is_file():
            try:
                m.where = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"'{index}' is not a valid safetensors index ({exc}); re-download it") from None
            for shard in sorted(set(m.where.values())):
                if not (root / shard).is_file():
                    raise UserError(f"shard '{root / shard}' named in {INDEX} is missing; download it into {root}")
                m._handle(shard)  # a truncated header fails here, before any work
        else:
            for f in sorted(root.glob("*.safetensors")):
                for name in m._handle(f.name).keys():
                    m.where[name] = f.name
        if not m.where:
            raise UserError(f"'{root}' has no safetensors weights; lazy loading needs *.safetensors files")
        return m

    def _handle(self, shard: str):
        """A new handle on `shard` (the caller drops it when done)."""
        from safetensors import safe_open

        try:
            return safe_open(str(self.root / shard), framework="pt")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise UserError(f"shard '{self.root / shard}' is truncated or corrupt ({str(exc).splitlines()[0]}); "
                            "re-download it") from None

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def read(self, name: str) -> torch.Tensor:
        """Tensor `name` as float32 (floating tensors) from its shard."""
        if name not in self.where:
            raise UserError(f"the checkpoint in '{self.root}' has no tensor '{name}'; it does not match its config.json")
        try:
            t = self._handle(self.where[name]).get_tensor(name)  # the tensor keeps its pages mapped, no longer
        except UserError:
            raise
        except Exception as exc:
            raise UserError(f"tensor '{name}' in shard '{self.root / self.where[name]}' cannot be read "
                            f"({str(exc).splitlines()[0]}); the shard is truncated or corrupt, re-download it") from None
        return t.to(torch.float32) if t.is_floating_point() else t


class LazyModel:
    """A transformers CausalLM on the meta device plus the shards its weights come from."""

    def __init__(self, model, shards: ShardMap):
        from .archs import family_for

        self.model = model
        self.shards = shards
        self.family = family_for(model.config.model_type)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))

    @classmethod
    def open(cls, model_dir) -> LazyModel:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        shards = ShardMap.of(model_dir)
        config = AutoConfig.from_pretrained(str(model_dir))
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        return cls(model, shards)

    def _source(self, name: str) -> str:
        """The checkpoint name holding parameter `name` (a tied head reads the embedding)."""
        if name not in self.shards and self.tied and name == f"{self._head_name()}.weight":
            emb = self.model.get_input_embeddings()
            return next(n for n, m in self.model.named_modules() if m is emb) + ".weight"
        return name

    def _read(self, name: str) -> torch.Tensor:
        """Parameter `name` from the shards (fused MoE experts stacked from their per-expert tensors, experts.py)."""
        from .experts import checkpoint_tensor

        t = checkpoint_tensor(self.family, name, self.shards)
        return t if t is not None else self.shards.read(self._source(name))

    def _head_name(self) -> str:
        head = self.model.get_output_embeddings()
        return next(n for n, m in self.model.named_modules() if m is head)

    def materialize(self, prefix: str) -> torch.nn.Module:
        """Read the parameters of sub-module `prefix` ('' for the whole model) from the shards; returns it."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        base = f"{prefix}." if prefix else ""
        state = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            t = self._read(base + name)
            if tuple(t.shape) != tuple(p.shape):
                raise UserError(f"tensor '{base + name}' has shape {tuple(t.shape)} in the checkpoint "
                                f"'{self.shards.root}', {tuple(p.shape)} in its config; the checkpoint does not match "
                                "its config.json")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"weight '{base + name}' in '{self.shards.root}' contains NaN/Inf; repair or "
                                "re-download the model before quantizing")
            state[name] = t
        for name, t in state.items():
            owner, attr = _owner(module, name)
            setattr(owner, attr, torch.nn.Parameter(t, requires_grad=False))
        return module

    def check_finite(self) -> None:
        """UserError naming the first tensor of the checkpoint that holds NaN/Inf (read one tensor at a time,
        before any work starts)."""
        for name in sorted(self.shards.where):
            t = self.shards.read(name)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"weight '{name}' in '{self.shards.root}' contains NaN/Inf; repair or re-download "
                                "the model before quantizing")

    def tensors(self, skip: set, select=None) -> dict:
        """Every state-dict tensor (those `select(name)` accepts) except the weights of the modules in `skip`:
        buffers as they are, parameters read from the shards as float32 (what the in-memory path's state_dict
        holds)."""
        out = {}
        buffers = dict(self.model.named_buffers())
        for name in self.model.state_dict().keys():
            if (name in skip or (name.endswith(".weight") and name[: -len(".weight")] in skip)
                    or (select and not select(name))):
                continue
            out[name] = buffers[name].detach().cpu() if name in buffers else self._read(name)
        return out

    def release(self, prefix: str) -> None:
        """Put sub-module `prefix`'s parameters back on the meta device (frees their memory)."""
        module = self.model.get_submodule(prefix)
        for name, p in list(module.named_parameters()):
            owner, attr = _owner(module, name)
            setattr(owner, attr, torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))


def _owner(module, dotted: str):
    parts = dotted.split(".")
    return module.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else module, parts[-1]


class EagerModel:
    """The same interface over a model loaded whole in memory (a `.bin` checkpoint): nothing to read or free."""

    def __init__(self, model):
        self.model = model

    def materialize(self, prefix: str) -> torch.nn.Module:
        return self.model.get_submodule(prefix) if prefix else self.model

    def check_finite(self) -> None:
        from .modeling import check_finite_weights

        check_finite_weights(self.model)

    def release(self, prefix: str) -> None:
        pass

    def tensors(self, skip: set, select=None) -> dict:
        """Every state-dict tensor (those `select(name)` accepts) except the weights of the modules in `skip`."""
        return {n: t.detach().cpu() for n, t in self.model.state_dict().items()
                if not (n.endswith(".weight") and n[: -len(".weight")] in skip) and (select is None or select(n))}


def open_model(model_dir):
    """A LazyModel when `model_dir` holds safetensors weights, else the model loaded whole (EagerModel)."""
    if any(Path(model_dir).glob("*.safetensors")):
        return LazyModel.open(model_dir)
    from .modeling import load_hf_model

    return EagerModel(load_hf_model(model_dir)[0])
