"""The registry of model families (`Family`, one entry per HF model_type) and reading a model directory.

Every part of the toolkit asks `family_for(config)` for what it needs to know about a model; no file
outside this package names a model_type.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .families import FAMILIES
from .family import BlockNorms, Family, LayerAttention, head_dim

REGISTRY: dict[str, Family] = {f.model_type: f for f in FAMILIES}

__all__ = ["REGISTRY", "BlockNorms", "Family", "LayerAttention", "family_for", "get_blocks", "head_dim",
           "read_model_dir", "register"]


def register(family: Family) -> Family:
    """Add a family (or replace the entry of its model_type)."""
    REGISTRY[family.model_type] = family
    return family


def family_for(config_or_type) -> Family:
    """The entry for a model_type (or a config dict's), or a UserError listing the supported ones."""
    mt = config_or_type.get("model_type", "<missing model_type>") if isinstance(config_or_type, dict) else config_or_type
    if mt not in REGISTRY:
        raise UserError(f"unsupported architecture '{mt}': neuqi-export supports {', '.join(sorted(REGISTRY))}; "
                        "convert a model of one of those")
    return REGISTRY[mt]


def read_model_dir(model_dir) -> tuple[Path, dict, Family]:
    """Check that `model_dir` is a HF model directory with weights; return (path, config, family)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory '{path}' does not exist; pass a local Hugging Face model directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{path}' has no config.json; pass a Hugging Face model directory (see `neuqi-export fetch`)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"'{path}' has no weights (*.safetensors or *.bin); download the model's weight files into it")
    from ..file_checks import hf_weights, read_json

    config = read_json(cfg_path, "restore the model's config.json")
    if "quantization_config" in config:
        qc = config["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
        raise UserError(f"'{path}' is already quantized ({method}); quantize the original full-precision model")
    hf_weights(path, config)  # shards, index and config sizes checked before anything is allocated
    return path, config, family_for(config)


def get_blocks(model, family: Family):
    """The ModuleList of decoder blocks of a loaded CausalLM."""
    obj = model
    for attr in family.blocks_path.split("."):
        obj = getattr(obj, attr)
    return obj
