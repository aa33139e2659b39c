"""Which Hugging Face architectures the quantizer knows, and how their decoder blocks are laid out."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# Inside a block, linears are quantized in these subsets, in this order (NEUQI.md); the linears of
# one subset read the same input, so they share one Hessian.
LLAMA_SUBSETS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ArchSpec:
    """Layout facts for one model_type."""

    model_type: str
    blocks_path: str  # attribute path from the CausalLM to the list of decoder blocks
    subsets: tuple
    qkv_bias: bool

    @property
    def linear_names(self) -> tuple:
        return tuple(name for subset in self.subsets for name in subset)


ARCHITECTURES = {
    "llama": ArchSpec("llama", "model.layers", LLAMA_SUBSETS, qkv_bias=False),
    "mistral": ArchSpec("mistral", "model.layers", LLAMA_SUBSETS, qkv_bias=False),
    "qwen2": ArchSpec("qwen2", "model.layers", LLAMA_SUBSETS, qkv_bias=True),
}


def arch_for(model_type: str) -> ArchSpec:
    """The spec for `model_type`, or a UserError listing what is supported."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported architecture '{model_type}': neuqi-export supports "
            f"{', '.join(sorted(ARCHITECTURES))}; convert a model of one of those"
        )
    return ARCHITECTURES[model_type]


def read_model_dir(model_dir) -> tuple[Path, dict, ArchSpec]:
    """Check that `model_dir` is a HF model directory with weights; return (path, config, spec)."""
    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory '{path}' does not exist; pass a local Hugging Face model directory")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"'{path}' has no config.json; pass a Hugging Face model directory (see `neuqi-export fetch`)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise UserError(f"'{path}' has no weights (*.safetensors or *.bin); download the model's weight files into it")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{cfg_path}' is not valid JSON ({exc}); restore the model's config.json") from None
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise UserError(f"'{path}' is already quantized ({method}); quantize the original full-precision model")
    return path, config, arch_for(config.get("model_type", "<missing model_type>"))


def get_blocks(model, spec: ArchSpec):
    """The ModuleList of decoder blocks of a loaded CausalLM."""
    obj = model
    for attr in spec.blocks_path.split("."):
        obj = getattr(obj, attr)
    return obj
