"""neuqi-export: NeUQI quantization of Hugging Face LLMs, exported to GGUF / ONNX / safetensors layouts."""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["optimal_zero_point", "init_params", "__version__"]


def __getattr__(name):  # lazy: `import neuqi_export` stays cheap for the CLI's --help
    if name == "optimal_zero_point":
        from .quant.zeropoint import optimal_zero_point

        return optimal_zero_point
    if name == "init_params":
        from .quant.params import init_params

        return init_params
    raise AttributeError(name)
