"""The commands of `neuqi-export`, each taking the parsed arguments and returning an exit code."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..errors import UserError
from .gguf_policy import gguf_fit, gguf_mixture, lattice_types
from .parser import FLOAT_HEAD


def _replay_budget(args) -> int | None:
    mb = getattr(args, "replay_memory", None)
    if mb is not None and mb < 0:
        raise UserError(f"--replay-memory {mb:g} is negative; pass a size in MB, or 0 to turn replay off")
    return None if mb is None else int(mb * 2**20)


def _activation_budget(args) -> int | None:
    mb = getattr(args, "activation_memory", None)
    if mb is not None and mb < 0:
        raise UserError(f"--activation-memory {mb:g} is negative; pass a size in MB, or 0 to keep every window on disk")
    return None if mb is None else int(mb * 2**20)


def _text_path(arg: str, which: str) -> str:
    if arg != "auto":
        return arg
    from ..assets import fetch_assets

    assets = fetch_assets()
    return str(assets.calib_text if which == "calib" else assets.eval_text)


def _model_path(arg: str, revision: str | None = None) -> str:
    """A local path as is; 'smollm2' (when no such path exists) the fetched default model; a hub repo id
    (org/name) its snapshot in the HF cache (hub.resolve_model)."""
    from ..hub import resolve_model

    return resolve_model(arg, revision)


def _options(args):
    from ..pipeline import QuantizeOptions

    if args.imatrix and args.calib != "auto":  # the imatrix's h replaces calibration: the text would be ignored
        raise UserError(f"--imatrix replaces calibration text, so --calib {args.calib} would be ignored; "
                        "drop --calib (or drop --imatrix to calibrate on that text)")
    _replay_budget(args), _activation_budget(args)  # checked before any work
    head = None if args.lm_head_bits == FLOAT_HEAD else args.lm_head_bits
    opts = QuantizeOptions(bits=args.bits, group_size=args.group_size, init=args.init or "neuqi", gptq=args.gptq,
                           act_order=not args.no_act_order, nsamples=args.nsamples, seqlen=args.seqlen,
                           seed=args.seed, calibrate=not (args.no_calib or args.imatrix), imatrix=args.imatrix,
                           lm_head_bits=head)
    opts.validate()
    return opts


def _importance(opts, model: str) -> dict | None:
    """The importance matrix --imatrix names, as {linear: h} for the pipeline (read by the GGUF converter, whose
    file format it is); None without --imatrix."""
    if not opts.imatrix:
        return None
    import json

    from converters.gguf.imatrix import read_imatrix

    return read_imatrix(opts.imatrix, json.loads((Path(model) / "config.json").read_text()))


def _warn_thin_calibration(opts, model: str) -> None:
    """One stderr line when GPTQ gets fewer calibration tokens than a linear has inputs: its H is then
    rank-deficient and GPTQ can do worse than the NeUQI fit alone (measured on Gemma-3-270M, tests/neuqi_export/
    test_gemma_real.py: 4 x 256 tokens, down_proj 2048 inputs: ppl 122.3 with GPTQ, 104.6 without)."""
    import json

    if not (opts.gptq and opts.calibrate):
        return
    cfg = json.loads((Path(model) / "config.json").read_text())
    cfg = cfg.get("text_config") or cfg
    widest = max(int(cfg.get(k) or 0) for k in ("hidden_size", "intermediate_size"))
    tokens = opts.nsamples * opts.seqlen
    if tokens < widest:
        print(f"warning: GPTQ on {tokens} calibration tokens (--nsamples {opts.nsamples} x --seqlen {opts.seqlen}), "
              f"fewer than the {widest} inputs of the widest linear: its Hessian is rank-deficient and GPTQ may do "
              "worse than without it; give more calibration (--nsamples) or drop --gptq", file=sys.stderr)


def cmd_quantize(args) -> int:
    from .. import distributed
    from ..data import read_text
    from ..pipeline import quantize_model, resolve_device

    opts = _options(args)
    model = _model_path(args.model_dir, args.revision)
    if args.for_gguf:
        opts.gguf_types = lattice_types(model, args.for_gguf, preset=None)
    _warn_thin_calibration(opts, model)
    text = None if not opts.calibrate else read_text(_text_path(args.calib, "calib"))
    world, device = distributed.init(resolve_device(args.device), getattr(args, "dist_timeout", None))
    summary = quantize_model(model, args.output, opts, calib_text=text, device=device, force=args.force,
                             progress=not args.quiet, replay_budget=_replay_budget(args),
                             importance=_importance(opts, model), activation_budget=_activation_budget(args))
    if world.rank == 0:
        print(summary)
        print(f"wrote {args.output}" + (f" ({world.size} processes)" if world.active else ""))
    return 0


def cmd_eval(args) -> int:
    import torch

    from ..data import eval_windows, read_text
    from ..evaluate import perplexity_from_logits_fn, perplexity_hf
    from ..master import MasterCheckpoint
    from ..modeling import load_hf_model, master_to_hf
    from ..pipeline import resolve_device

    path = Path(_model_path(args.path, args.revision))
    if not path.exists():
        raise UserError(f"'{path}' does not exist; pass a model directory or a master checkpoint")
    text = read_text(_text_path(args.text, "eval"))
    device = resolve_device(args.device)
    t0 = time.time()

    from runtimes.registry import load_all, runtime_for

    runtimes = load_all()
    if args.runtime is not None and args.runtime not in runtimes and args.runtime != "transformers":
        raise UserError(f"--runtime {args.runtime} is unknown; use one of transformers, {', '.join(sorted(runtimes))}")
    runtime = runtimes.get(args.runtime) if args.runtime else runtime_for(path)
    tok_dir = Path(args.tokenizer) if args.tokenizer else (path if path.is_dir() else path.parent)
    if not any((tok_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise UserError(f"no tokenizer files in '{tok_dir}'; pass --tokenizer DIR (e.g. the master checkpoint)")
    from ..modeling import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
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

    from ..master import MasterCheckpoint

    out = Path(args.output)
    _check_output(out, args.force)
    t0 = time.perf_counter()
    master = MasterCheckpoint.load(args.source)
    exporter = load_all()[args.to]
    report = exporter.export(master, out, **exporter.options(args))
    print(report.summary())
    print(f"time: export {time.perf_counter() - t0:.1f} s")
    return 0


def _check_format(model_dir, fmt: str) -> None:
    """The format's own refusal of this model (a feature it cannot express), before any quantizing."""
    from converters.registry import load_all

    from ..archs import read_model_dir

    check = load_all()[fmt].check
    if check is not None:
        check(read_model_dir(model_dir)[1])


def cmd_convert(args) -> int:
    import tempfile

    from ..data import read_text
    from ..pipeline import quantize_model

    out = Path(args.output)
    _check_output(out, args.force)
    fit = gguf_fit(args)
    if args.bits is None:
        args.bits = 8 if fit == "master" and gguf_mixture(args) else 4
        if args.bits == 8:
            args.allow_narrower = True
            print("GGUF mixture: quantizing an 8-bit master and refitting each tensor into its type on diag(H) "
                  "(pass --bits to choose the master's width)")
    _format_defaults(args, fit)
    opts = _options(args)
    args.source = _model_path(args.source, args.revision)
    _check_format(args.source, args.to)
    _warn_thin_calibration(opts, args.source)
    if fit == "lattice":
        preset = getattr(args, "preset", None)
        opts.gguf_types = lattice_types(args.source, args.gguf_type, preset)
        print(f"GGUF {preset or args.gguf_type}: fitting each linear's block parameters for its GGUF type on diag(H)"
              + (" and running GPTQ on that lattice" if opts.gptq else " (add --gptq to run GPTQ on that lattice)"))
    text = None if not opts.calibrate else read_text(_text_path(args.calib, "calib"))
    with tempfile.TemporaryDirectory(prefix=".neuqi-convert-", dir=out.parent if out.parent.exists() else None) as tmp:
        master_dir = Path(tmp) / "master"
        print(quantize_model(args.source, master_dir, opts, calib_text=text, device=args.device,
                             progress=not args.quiet, replay_budget=_replay_budget(args),
                             importance=_importance(opts, args.source),
                             activation_budget=_activation_budget(args)))
        args.source = str(master_dir)
        return cmd_export(args)


def _format_defaults(args, fit) -> None:
    """convert's --init and --lm-head-bits, when not given: the target format's declared preference
    (Exporter.init / Exporter.head_bits, measured in docs/SIZES.md); said in one line when it is not the default."""
    from converters.registry import load_all

    exp = load_all()[args.to]
    said = []
    if args.init is None:
        args.init = exp.init
        if exp.init != "neuqi":
            said.append(f"--init {exp.init}")
    if args.lm_head_bits is None and exp.head_bits is not None and fit != "lattice" and not (args.no_calib or args.imatrix):
        args.lm_head_bits = exp.head_bits
        said.append(f"--lm-head-bits {exp.head_bits}")
    if said:
        print(f"{args.to}: quantizing with {' '.join(said)} (the format's default; docs/SIZES.md)")


def cmd_distill(args) -> int:
    from ..data import read_text
    from ..distill import DistillOptions, distill

    opts = DistillOptions(nsamples=args.nsamples, seqlen=args.seqlen, steps=args.steps, lr=args.lr, seed=args.seed,
                          checkpoint_every=args.checkpoint_every)
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
    from ..assets import fetch_assets

    if args.model == "gemma3-270m":
        from ..gemma_asset import LICENCE, fetch_gemma

        path = fetch_gemma(cache_dir=args.cache_dir, force=args.force)
        print(f"model: {path}\nlicence: {LICENCE}; the terms are in {path / 'GEMMA_TERMS.html'}")
        return 0

    assets = fetch_assets(cache_dir=args.cache_dir, force=args.force)
    print(f"model: {assets.model_dir}\ncalibration text: {assets.calib_text}\nevaluation text: {assets.eval_text}")
    return 0


COMMANDS = {"quantize": cmd_quantize, "eval": cmd_eval, "fetch": cmd_fetch, "export": cmd_export,
            "convert": cmd_convert, "distill": cmd_distill, "demo": cmd_demo}
