"""Training state (nested dicts/lists of tensors, numbers and strings) stored without pickle.

A resumable distillation keeps its parameters, optimizer and scheduler state between runs. torch.save would
pickle them, and a pickle loaded from a partial directory can execute code; here the tensors go into a
safetensors file and everything else into a JSON skeleton in its metadata, so loading only parses.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import UserError
from .safetensors_io import save_file

_SKELETON = "neuqi.train_state"


def _flatten(obj, tensors: dict):
    """The JSON skeleton of `obj`, its tensors moved into `tensors` under generated keys."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state), so pairs rather than a JSON object
        return {"dict": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_flatten(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    raise TypeError(f"train state holds a {type(obj).__name__}, which cannot be stored without pickle")


def _unflatten(node, tensors: dict):
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "dict" in node:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in node["dict"]}
    if "list" in node:
        return [_unflatten(v, tensors) for v in node["list"]]
    if "tuple" in node:
        return tuple(_unflatten(v, tensors) for v in node["tuple"])
    return node["value"]


def save_state(state, path: Path) -> None:
    """Write `state` to the safetensors file `path` (the caller makes the write atomic)."""
    tensors: dict = {}
    skeleton = _flatten(state, tensors)
    save_file(tensors, path, metadata={_SKELETON: json.dumps(skeleton)})


def load_state(path: Path):
    """The state `save_state` wrote to `path`; a damaged file ends in one line naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unflatten(json.loads(meta[_SKELETON]), tensors)
    except Exception as e:  # noqa: BLE001 - any damage means the same thing to the user
        raise UserError(f"resume state '{path}' is damaged ({type(e).__name__}); delete it to start over") from None
