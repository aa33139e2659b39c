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
    advice: str = ""  # one line for the user (e.g. how to avoid the refits), printed after the tensors

    def summary(self) -> str:
        exact = sum(t.exact for t in self.tensors)
        refit = [t for t in self.tensors if not t.exact]
        lines = [f"wrote {self.path} ({self.bytes / 2**20:.1f} MiB): {exact} tensors exact, {len(refit)} refit"]
        for t in refit:
            lines.append(f"  refit {t.name}: {t.type}, added weighted error {t.added_error:.4g} {t.note}".rstrip())
        if self.advice:
            lines.append(self.advice)
        return "\n".join(lines)


@dataclass
class Exporter:
    """One export format: its CLI options, its writer with plain keyword options, the master record kinds it takes."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]  # format-specific CLI options
    # write(master: MasterCheckpoint, out: Path, **options) -> report: the format's own function, every option defaulted
    write: Callable[..., ExportReport]
    # options_from_args(parsed CLI args) -> write()'s keyword options for this format's own CLI options
    options_from_args: Callable[[argparse.Namespace], dict]
    # the master record kinds (QuantizedLinear.kind "uniform", GGUFLinear.kind "gguf") write() can take
    accepts: tuple[str, ...] = ("uniform",)
    # check(config dict) -> None: UserError for a model the format cannot express (convert calls it before quantizing)
    check: Callable[[dict], None] | None = None
    # what `convert --to NAME` quantizes with unless the user says otherwise (the format's measured preference,
    # docs/SIZES.md): the output head's width (--lm-head-bits; None = float head) and the init (--init)
    head_bits: int | None = None
    init: str = "neuqi"

    def options(self, args: argparse.Namespace) -> dict:
        """export()'s keyword options from parsed CLI args: the format's own, and overwrite from --force."""
        return {"overwrite": bool(getattr(args, "force", False)), **self.options_from_args(args)}

    def export(self, master, out, **options) -> ExportReport:
        """Write `master` (a MasterCheckpoint or its directory) to `out` with write()'s keyword options; a master
        holding a record kind this format does not accept is refused in one line before anything is written."""
        from neuqi_export.master import MasterCheckpoint

        if isinstance(master, (str, Path)):
            master = MasterCheckpoint.load(master)
        require_kinds(master, self)
        return self.write(master, Path(out), **options)


EXPORTERS: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    EXPORTERS[exporter.name] = exporter
    return exporter


def load_all() -> dict[str, Exporter]:
    """Import every converter module so that it registers (optional ones that fail to import are skipped)."""
    import importlib

    for mod in ("converters.gguf", "converters.onnx", "converters.mlx", "converters.compressed_tensors"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("converters"):
                raise
    return EXPORTERS


def record_kinds(master) -> dict[str, list[str]]:
    """{record kind: names of the master's linears of that kind}, read from the records' classes (a lazily loaded
    master's linears are not read)."""
    kinds: dict[str, list[str]] = {}
    for name in master.linears:
        kinds.setdefault(master.record_class(name).kind, []).append(name)
    return kinds


def require_kinds(master, exporter: Exporter) -> None:
    """UserError (one line, naming the kind and the fix) when `master` holds a record kind `exporter` does not accept."""
    from neuqi_export.errors import UserError

    for kind, names in record_kinds(master).items():
        if kind not in exporter.accepts:
            takers = sorted(e.name for e in EXPORTERS.values() if kind in e.accepts)
            fix = f"export it with --to {' or '.join(takers)}, or" if takers else "instead"
            raise UserError(f"this master holds {len(names)} linears of record kind '{kind}' (e.g. {names[0]}), which "
                            f"--to {exporter.name} cannot take (it takes {', '.join(exporter.accepts)}); {fix} quantize "
                            "a uniform master with `neuqi-export quantize`")


def prepare_output(out, overwrite: bool) -> Path:
    """`out` as a Path, or a UserError when it exists and `overwrite` is not set."""
    from neuqi_export.errors import UserError

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    return out


def choose(value, table: dict, option: str):
    """table[value], or a UserError naming the option and its choices."""
    from neuqi_export.errors import UserError

    if value not in table:
        raise UserError(f"{option} {value!r} is not one of {', '.join(table)}; pick one of those")
    return table[value]


def write_safetensors_dir(out, tensors, config, tokenizer_dir, metadata: dict,
                          max_shard_size: str | int = "5GB") -> int:
    """Write the tensors (as Hugging Face shards them: one model.safetensors, or shards of at most
    `max_shard_size` with an index; converters/shards.py) + config.json + the tokenizer files as directory `out`,
    all-or-nothing (replacing an existing `out`; callers check --force first). `tensors`: a dict (each dropped as
    its shard is written) or an iterable of (name, tensor) pairs; `config`: a dict, or a callable giving it once
    every tensor is written (what it says may depend on them). Returns the directory's size in bytes."""
    import json
    import shutil

    from neuqi_export.atomic import atomic_directory
    from neuqi_export.master import TOKENIZER_FILES

    from .shards import parse_size, write_tensors

    parse_size(max_shard_size)  # a bad size is refused before anything is written
    out = Path(out)
    with atomic_directory(out, overwrite=True) as tmp:
        write_tensors(tmp, tensors, max_shard_size, metadata)
        config = config() if callable(config) else config
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copy2(src, tmp / fname)
    return sum(f.stat().st_size for f in out.iterdir() if f.is_file())
