"""What the CLI asks of the GGUF converter before quantizing: which linears go on which GGUF type's lattice
(K-quant-aware mode) and whether a GGUF target is a llama-quantize mixture."""
from __future__ import annotations

from ..errors import UserError


GGUF_FITS = ("lattice", "master")
GGUF_FIT_DEFAULT = "lattice"


def lattice_types(model: str, qtype: str, preset: str | None) -> dict[str, str]:
    """{linear: GGUF type} for the K-quant-aware mode: `preset`'s plan, a mixture name's plan, or one K type
    with llama-quantize's fallbacks; UserError for a type that has no lattice mode."""
    from converters.gguf.presets import PRESETS, is_mixture, linear_types
    from converters.gguf.types import SINGLE_TYPES, TYPES

    from ..archs import read_model_dir

    name = str(qtype).upper()
    if preset is None and is_mixture(name):
        preset = name
    if preset is None and not (name in SINGLE_TYPES and TYPES[name].levels):  # what `export --type` accepts too
        singles = sorted(t for t in SINGLE_TYPES if TYPES[t].levels)
        raise UserError(f"GGUF type {qtype!r} has no K-quant-aware mode; use one of {', '.join(singles)} or a "
                        f"llama-quantize mixture ({', '.join(p for p in PRESETS if is_mixture(p))})")
    _, config, spec = read_model_dir(model)
    return linear_types(config, preset=preset, qtype=None if preset else name, prefix=spec.blocks_path)


def gguf_fit(args) -> str | None:
    """'lattice' / 'master' for a GGUF export to K types or a mixture; None for other targets and exact types."""
    if args.to != "gguf":
        return None
    from converters.gguf.types import TYPES

    if not (gguf_mixture(args) or (args.gguf_type in TYPES and not TYPES[args.gguf_type].stores_master)):
        if args.gguf_fit == "lattice":
            raise UserError(f"--gguf-fit lattice is for K types and llama-quantize mixtures, not --type {args.gguf_type} "
                            "(Q4_1/Q5_1 store the master exactly); drop --gguf-fit")
        return None
    return args.gguf_fit or GGUF_FIT_DEFAULT


def gguf_mixture(args) -> bool:
    """Is this a GGUF export with a llama-quantize mixture (per-tensor types, not one uniform grid)?"""
    if args.to != "gguf":
        return False
    from converters.gguf.presets import is_mixture

    return bool(getattr(args, "preset", None)) or is_mixture(args.gguf_type)
