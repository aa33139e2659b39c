"""The one registry of runtimes: name -> Runtime. A runtime loads an artifact and gives logits."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np


class Scorer(Protocol):
    """A loaded artifact. logits: int64 (b, L) token ids -> float32 (b, L, vocab)."""

    def logits(self, ids: np.ndarray) -> np.ndarray: ...

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]: ...


@dataclass
class Runtime:
    name: str
    detects: Callable[[Path], bool]  # is this artifact one this runtime loads?
    load: Callable[..., Scorer]  # load(path, **options) -> Scorer


RUNTIMES: dict[str, Runtime] = {}


def register(runtime: Runtime) -> Runtime:
    RUNTIMES[runtime.name] = runtime
    return runtime


def load_all() -> dict[str, Runtime]:
    import importlib

    for mod in ("runtimes.llamacpp", "runtimes.onnxruntime", "runtimes.mlx", "runtimes.transformers"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("runtimes"):
                raise
    return RUNTIMES


def runtime_for(path: Path) -> Runtime | None:
    for rt in load_all().values():
        if rt.detects(Path(path)):
            return rt
    return None
