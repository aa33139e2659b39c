"""The helper modules under tests/converters (onnx_fixtures.py, gguf_fixtures.py: not named test_*, so pytest does
not collect them), loaded by path from any test package, once per session."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_NAMES = {"onnx_fixtures": "onnx_test_fixtures", "gguf_fixtures": "gguf_test_fixtures"}


def converter_fixtures(name: str):
    """The module tests/converters/<name>.py (one instance, kept in sys.modules)."""
    mod_name = _NAMES[name]
    if mod_name not in sys.modules:
        path = Path(__file__).resolve().parent / "converters" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[mod_name]
