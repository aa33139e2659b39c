"""Sequential NeUQI (+ GPTQ) quantization of a HF causal LM into a master checkpoint.

Block k is calibrated on the outputs of blocks < k already quantized; inside a block the linear
subsets [q,k,v] -> [o] -> [gate,up] -> [down] are taken in order, each Hessian collected with the
earlier subsets quantized (NEUQI.md). Only the block being quantized sits on the compute device.
Finished blocks are saved under `<out>.partial/`, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .arch import get_blocks, read_model_dir
from .errors import UserError
from .gptq import GPTQFactor, gptq_quantize, weighted_error
from .hessian import HessianAccumulator
from .master import EMBED, HEAD, GGUFLinear, MasterCheckpoint, QuantizedLinear
from .partial import discard_stale, load_block as _load_block, mark, partial_dir, save_block as _save_block
from .quant.grid import dequantize, quantize_codes
from .quant.params import init_params
from .replay import BlockReplay, default_budget
from .timing import StageTimer

SUPPORTED_BITS = (2, 3, 4, 8)
# the wall time per stage of the run that wrote a master, beside its config (the one file that differs run to run)
TIMING_FILE = "quantize_timing.json"
INIT_METHODS = ("minmax", "mse", "neuqi_int", "neuqi")
# Methods whose objective uses the calibration diag(H); minmax and mse are data-free by definition.
USES_HDIAG = ("neuqi_int", "neuqi")


@dataclass
class QuantizeOptions:
    """Everything that decides the quantized result (hashed to recognise a resumable run)."""

    bits: int = 4
    group_size: int = 128
    init: str = "neuqi"
    gptq: bool = False
    act_order: bool = True
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    percdamp: float = 0.01
    calibrate: bool = True  # False: data-free (h ≡ 1, no GPTQ)
    # K-quant-aware mode: {HF linear name: GGUF type}; those linears are fitted and GPTQ'd on the type's
    # own lattice (converters.gguf.lattice) instead of a uniform `bits` grid
    gguf_types: dict | None = None
    # a llama.cpp imatrix file whose per-linear h replaces calibration (data-free otherwise: no GPTQ)
    imatrix: str | None = None
    # quantize the output head too (for tied embeddings: the one shared matrix), at these bits; None keeps it float
    lm_head_bits: int | None = None

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        g = self.group_size
        if not (g == -1 or (g > 0 and g & (g - 1) == 0)):
            raise UserError(f"--group-size {g} is not a positive power of two or -1 (per-channel); use e.g. 32, 64, 128 or -1")
        if self.init not in INIT_METHODS:
            raise UserError(f"--init {self.init!r} is unknown; use one of {', '.join(INIT_METHODS)}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.imatrix and self.calibrate:
            raise UserError("--imatrix replaces calibration text; pass --no-calib with it (or drop --imatrix)")
        if self.lm_head_bits is not None:
            if self.lm_head_bits not in SUPPORTED_BITS:
                raise UserError(f"--lm-head-bits {self.lm_head_bits} is not supported; use one of "
                                f"{', '.join(map(str, SUPPORTED_BITS))}")
            if self.gguf_types:
                raise UserError("--lm-head-bits does not combine with quantizing on a GGUF type's lattice (--for-gguf, "
                                "or convert --to gguf with --gguf-fit lattice): the type's mixture sets the output "
                                "tensor's type; drop --lm-head-bits, or convert with --gguf-fit master")
        if self.gptq and not self.calibrate:
            raise UserError("--gptq needs calibration text (an imatrix holds only diag(H)); drop --gptq, or "
                            "calibrate instead of --no-calib/--imatrix")


@dataclass
class QuantizeSummary:
    seconds: float
    layers: int
    diag_loss: float  # Σ_layers Σ_j h_j (w_j − ŵ_j)²
    hessian_loss: float  # Σ_layers tr(ΔW H ΔWᵀ)
    resumed_blocks: int = 0
    per_layer: dict = field(default_factory=dict)
    timing: str = ""  # StageTimer.report(): wall time per stage

    def __str__(self) -> str:
        return (f"quantized {self.layers} linears in {self.seconds:.1f} s; summed diag-H loss {self.diag_loss:.6g}, "
                f"summed full-H loss {self.hessian_loss:.6g}"
                + (f" (resumed after {self.resumed_blocks} finished blocks)" if self.resumed_blocks else "")
                + (f"\n{self.timing}" if self.timing else ""))


class _StopForward(Exception):
    pass


def _submodule(block, dotted: str):
    obj = block
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model, blocks, windows: torch.Tensor, device, progress: bool = False) -> tuple[list, dict]:
    """Hidden states entering block 0 for each window (kept on CPU) and the block kwargs."""
    captured, kwargs_box = [], {}

    def grab(module, args, kwargs):
        captured.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        if not kwargs_box:
            kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    inner = model.model
    embed = inner.embed_tokens.to(device)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is not None:
        rotary.to(device)
    try:
        for i in tqdm(range(windows.shape[0]), desc="calibration", unit="window", disable=not progress, leave=False):
            try:
                inner(input_ids=windows[i : i + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        embed.to("cpu")
    kwargs = kwargs_box
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return captured, _to(kwargs, "cpu")


def _fingerprint(model_dir: Path, opts: QuantizeOptions, calib_text: str | None) -> str:
    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode())
    h.update(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    if calib_text is not None:
        h.update(hashlib.sha256(calib_text.encode()).digest())
    if opts.imatrix:
        h.update(hashlib.sha256(Path(opts.imatrix).read_bytes()).digest())
    return h.hexdigest()[:16]


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, opts: QuantizeOptions, name: str | None = None,
                    importance: torch.Tensor | None = None, timer: StageTimer | None = None,
                    factor: GPTQFactor | None = None) -> tuple[QuantizedLinear | GGUFLinear, dict, torch.Tensor]:
    """Init params for every group of W (from the original W), then GPTQ or round-to-nearest; a linear
    that opts.gguf_types names is quantized on its GGUF type's lattice instead. importance: an imatrix h
    (n_in,) used as diag(H) when there is no H (damped like H); factor: GPTQFactor.of(H) shared by a subset.
    Returns (record, losses, dequantized W)."""
    timer = timer or StageTimer()
    if not torch.isfinite(W).all():
        raise UserError("a weight contains NaN/Inf; repair the model before quantizing")
    if H is not None:
        hdiag = torch.diagonal(H).to(torch.float32).contiguous()
    elif importance is not None:
        h = importance.to(W.device, torch.float32)
        hdiag = h + opts.percdamp * h.mean().clamp_min(1e-12)
    else:
        hdiag = torch.ones(W.shape[1], device=W.device)
    if opts.gguf_types and name in opts.gguf_types:
        from converters.gguf.lattice import quantize_for_type

        res = quantize_for_type(W, H, hdiag, opts.gguf_types[name], gptq=opts.gptq, act_order=opts.act_order,
                                timer=timer, factor=factor)
        deq = res.deq.to(W.device)
        rec = GGUFLinear(torch.from_numpy(res.data), opts.gguf_types[name], tuple(W.shape), hdiag.cpu())
    else:
        has_h = H is not None or importance is not None
        with timer.stage("fit"):
            scale, zero = init_params(W, opts.bits, opts.group_size, method=opts.init,
                                      hdiag=hdiag if (opts.init in USES_HDIAG and has_h) else None)
        eff_gs = W.shape[1] if opts.group_size == -1 else opts.group_size
        if opts.gptq:
            with timer.stage("gptq"):
                codes = gptq_quantize(W, H, scale, zero, opts.bits, opts.group_size, act_order=opts.act_order,
                                      factor=factor)
        else:
            codes = quantize_codes(W, scale, zero, opts.bits, eff_gs)
        deq = dequantize(codes, scale, zero, eff_gs)
        rec = QuantizedLinear(codes.cpu(), scale.float().cpu(), zero.float().cpu(), opts.bits, opts.group_size,
                              hdiag.cpu())
    with timer.stage("loss"):
        losses = {"diag": float(((W.double() - deq.double()) ** 2 * hdiag.double()).sum())}
        losses["hessian"] = weighted_error(W, deq, H) if H is not None else losses["diag"]
    return rec, losses, deq


@torch.no_grad()
def _quantize_block(block, k: int, prefix: str, spec, inputs: list, kwargs: dict, opts: QuantizeOptions, device,
                    bar, importance: dict | None = None, timer: StageTimer | None = None,
                    replay: BlockReplay | None = None) -> tuple[dict, dict]:
    """Quantize block k's linears subset by subset, each subset's H collected over `inputs` with the earlier
    subsets quantized; `replay` (if given) returns what earlier passes already computed (replay.py)."""
    timer = timer or StageTimer()
    records, losses = {}, {}
    layers = tqdm(total=len(spec.linear_names), desc=f"block {k} linears", unit="linear", leave=False,
                  disable=bar.disable)
    for done, subset in enumerate(spec.subsets):
        first = _submodule(block, subset[0])
        H = None
        if opts.calibrate:
            acc = HessianAccumulator(first.in_features, device=device)

            def hook(module, args):
                with timer.stage("hessian"):
                    acc.add(args[0])
                raise _StopForward  # nothing after this subset's input is needed

            handle = first.register_forward_pre_hook(hook)
            if replay is not None:
                replay.begin_pass(done)
            try:
                with timer.stage("calibration forward"):
                    for w, x in enumerate(inputs):
                        if replay is not None:
                            replay.window = w
                        try:
                            block(x.to(device), **kwargs)
                        except _StopForward:
                            pass
            finally:
                handle.remove()
                if replay is not None:
                    replay.end_pass()
            H = acc.damped(opts.percdamp)
        factor = None
        if opts.gptq and H is not None:  # one inverse Cholesky per subset: its linears share H
            with timer.stage("gptq"):
                factor = GPTQFactor.of(H, opts.act_order, device)
        for name in subset:
            lin = _submodule(block, name)
            full = f"{prefix}.{k}.{name}"
            W = lin.weight.data.to(torch.float32)
            if not torch.isfinite(W).all():
                raise UserError(f"weight '{full}.weight' contains NaN/Inf; repair the model before quantizing")
            rec, loss, deq = quantize_linear(W, H, opts, full, None if importance is None else importance.get(full),
                                             timer=timer, factor=factor)
            lin.weight.data = deq.to(device, lin.weight.dtype)
            records[full], losses[full] = rec, loss
            layers.set_postfix_str(f"{name} loss {loss['hessian']:.3g}")
            layers.update()
    layers.close()
    return records, losses


@torch.no_grad()
def _quantize_head(model, hidden: list, opts: QuantizeOptions, device, part_file: Path, importance: dict | None,
                   progress: bool, timer: StageTimer) -> tuple[QuantizedLinear, dict]:
    """Quantize the output head (`lm_head`; for tied embeddings the shared matrix) at opts.lm_head_bits with the
    body's group size, init and GPTQ, its H from the final norm's outputs on the last block's outputs `hidden`.
    Resumable: the record is kept in `part_file` until the master is written."""
    head_opts = replace(opts, bits=opts.lm_head_bits)
    if part_file.exists():
        recs, ls = _load_block(part_file, [HEAD], head_opts)
        return recs[HEAD], ls[HEAD]
    head = model.get_output_embeddings()
    W = head.weight.data.to(torch.float32)
    if not torch.isfinite(W).all():
        raise UserError("weight 'lm_head.weight' contains NaN/Inf; repair the model before quantizing")
    H = None
    if opts.calibrate:
        norm = model.model.norm.to(device)
        acc = HessianAccumulator(W.shape[1], device=device)
        for x in tqdm(hidden, desc="lm_head", unit="window", disable=not progress, leave=False):
            with timer.stage("calibration forward"):
                y = norm(x.to(device))
            with timer.stage("hessian"):
                acc.add(y)
        norm.to("cpu")
        H = acc.damped(opts.percdamp)
    imp = None if importance is None else importance.get(HEAD)
    rec, loss, _ = quantize_linear(W.to(device), H, head_opts, HEAD, imp, timer=timer)
    with timer.stage("write"):
        _save_block(part_file, {HEAD: rec}, {HEAD: loss})
    return rec, loss


@torch.no_grad()
def _block_outputs(block, inputs: list, kwargs: dict, device, replay: BlockReplay | None = None,
                   done: int = 0) -> list:
    """The block's output for every window (CPU); `replay`: after `done` subsets were quantized in it."""
    if replay is None:
        return [block(x.to(device), **kwargs).detach().cpu() for x in inputs]
    replay.begin_pass(done, last=True)
    try:
        out = []
        for w, x in enumerate(inputs):
            replay.window = w
            out.append(block(x.to(device), **kwargs).detach().cpu())
        return out
    finally:
        replay.close()


def quantize_model(model_dir, out, opts: QuantizeOptions, calib_text: str | None = None, device: str = "cpu",
                   force: bool = False, progress: bool = True, replay_budget: int | None = None) -> QuantizeSummary:
    """Quantize the HF model in `model_dir` into a master checkpoint at `out` (atomic, resumable).
    replay_budget: bytes for replayed sub-module outputs within a block (replay.py; 0 turns replay off; None:
    a quarter of the free memory). It changes no result, only the time."""
    from .data import calibration_windows
    from .modeling import check_finite_weights, load_hf_model

    timer = StageTimer()
    opts.validate()
    model_dir, _, spec = read_model_dir(model_dir)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    device = resolve_device(device)
    budget = default_budget(device) if replay_budget is None else int(replay_budget)
    if opts.calibrate and calib_text is None:
        raise UserError("no calibration text given; pass --calib FILE (or --no-calib for data-free init)")
    importance = None
    if opts.imatrix:
        from converters.gguf.imatrix import read_imatrix  # llama.cpp's file format lives with the GGUF converter

        if not Path(opts.imatrix).is_file():
            raise UserError(f"imatrix file '{opts.imatrix}' does not exist; pass a llama.cpp imatrix (.gguf or .dat)")
        importance = read_imatrix(opts.imatrix, json.loads((model_dir / "config.json").read_text()))
    with timer.stage("load"):
        model, tokenizer, config = load_hf_model(model_dir)
        check_finite_weights(model)
        blocks = get_blocks(model, spec)
        prefix = spec.blocks_path
        if opts.calibrate:
            windows = calibration_windows(tokenizer, calib_text, opts.nsamples, opts.seqlen, seed=opts.seed)
        else:
            windows = torch.zeros(1, 2, dtype=torch.long)  # one tiny window: only shapes flow, no H is collected

    partial = partial_dir(out)
    fp = _fingerprint(model_dir, opts, calib_text)
    discard_stale(partial, fp)
    mark(partial, fp, asdict(opts))

    with timer.stage("calibration forward"):
        inputs, kwargs = capture_block_inputs(model, blocks, windows, device, progress=progress and opts.calibrate)
        kwargs = _to(kwargs, device)

    records, losses, resumed = {}, {}, 0
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not progress)
    for k in bar:
        block = blocks[k].to(device)
        names = [f"{prefix}.{k}.{n}" for n in spec.linear_names]
        block_file = partial / f"block_{k:04d}.safetensors"
        replay = None
        if block_file.exists():  # finished in an earlier run: its records, and the block's outputs recomputed
            with timer.stage("resume"):
                recs, ls = _load_block(block_file, names, opts)
                for n, rec in recs.items():
                    lin = _submodule(block, n[len(f"{prefix}.{k}.") :])
                    lin.weight.data = rec.dequantize().to(device, lin.weight.dtype)
            resumed += 1
        else:
            if opts.calibrate and budget > 0:
                replay = BlockReplay(block, spec.subsets, len(inputs), budget)
            recs, ls = _quantize_block(block, k, prefix, spec, inputs, kwargs, opts, device, bar, importance, timer,
                                       replay)
            with timer.stage("write"):
                _save_block(block_file, recs, ls)
        records.update(recs)
        losses.update(ls)
        if k + 1 < len(blocks) or opts.lm_head_bits is not None:
            with timer.stage("calibration forward"):
                inputs = _block_outputs(block, inputs, kwargs, device, replay, len(spec.subsets))
        elif replay is not None:
            replay.close()
        blocks[k] = block.to("cpu")
    tied = bool(config.get("tie_word_embeddings", False))
    if opts.lm_head_bits is not None:
        rec, loss = _quantize_head(model, inputs, opts, device, partial / "lm_head.safetensors", importance,
                                   progress=not bar.disable, timer=timer)
        records[HEAD], losses[HEAD] = rec, loss

    tensors = {n: t.detach().cpu() for n, t in model.state_dict().items()
               if not (n.endswith(".weight") and n[: -len(".weight")] in records)}
    if tied:
        tensors.pop("lm_head.weight", None)
        if HEAD in records:  # the one shared matrix: the embedding is the quantized head, derived on load
            tensors.pop(EMBED, None)
    qcfg = {"quant_method": "neuqi", "bits": opts.bits, "group_size": opts.group_size, "init": opts.init,
            "gptq": opts.gptq, "act_order": opts.act_order, "static_groups": True, "nsamples": opts.nsamples,
            "seqlen": opts.seqlen, "seed": opts.seed, "percdamp": opts.percdamp, "calibrated": opts.calibrate,
            "imatrix": Path(opts.imatrix).name if opts.imatrix else None, "gguf_lattice": bool(opts.gguf_types)}
    if HEAD in records:
        qcfg["lm_head"] = {"bits": opts.lm_head_bits, "tied_embedding": tied}
    master = MasterCheckpoint(config={**config, "quantization_config": qcfg}, linears=records, tensors=tensors,
                              tokenizer_dir=model_dir)
    with timer.stage("write"):
        master.save(out, overwrite=force)
    times = timer.ordered()
    (out / TIMING_FILE).write_text(json.dumps({"seconds": {k: round(v, 3) for k, v in times.items()},
                                               "total": round(timer.total(), 3), "device": str(device),
                                               "threads": torch.get_num_threads()}, indent=1) + "\n")
    shutil.rmtree(partial, ignore_errors=True)
    return QuantizeSummary(
        seconds=timer.total(), layers=len(records),
        diag_loss=sum(v["diag"] for v in losses.values()), hessian_loss=sum(v["hessian"] for v in losses.values()),
        resumed_blocks=resumed, per_layer=losses, timing=timer.report(),
    )


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None/'auto' (CUDA when present); UserError for an unusable choice."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise UserError(f"--device {device!r} is unknown; use cpu, cuda or auto")
    return torch.device(device)
