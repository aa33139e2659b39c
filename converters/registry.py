"""The one registry of export formats: name -> Exporter. Each converter module registers itself."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class TensorReport:
    """What happened to one tensor on export."""

    name: str
    type: str  # e.g. Q4_1, Q2_K, F16, MatMulNBits-4
    exact: bool  # dequantizes to the master's values (up to the storage dtype of scale/zero)
    added_error: float = 0.0  # diag-H weighted error added by a refit (0 when exact)
    note: str = ""


@dataclass
class ExportReport:
    path: Path
    bytes: int
    tensors: list[TensorReport] = field(default_factory=list)

    def summary(self) -> str:
        exact = sum(t.exact for t in self.tensors)
        refit = [t for t in self.tensors if not t.exact]
        lines = [f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB): {exact} tensors exact, {len(refit)} refit"]
        for t in refit:
            lines.append(f"  refit {t.name}: {t.type}, added weighted error {t.added_error:.4g} {t.note}".rstrip())
        return "\n".join(lines)


@dataclass
class Exporter:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # format-specific CLI options
    export: Callable[..., ExportReport]  # export(master: MasterCheckpoint, out: Path, args: Namespace) -> report


EXPORTERS: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def load_all() -> dict[str, Exporter]:
    """Import every converter module so that it registers (optional ones that fail to import are skipped)."""
    import importlib

    for mod in ("converters.gguf", "converters.onnx"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("converters"):
                raise
    return EXPORTERS
