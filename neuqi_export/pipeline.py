"""Sequential NeUQI (+ GPTQ) quantization of a HF causal LM into a master checkpoint.

Block k is calibrated on the outputs of blocks < k already quantized; inside a block the linear
subsets [q,k,v] -> [o] -> [gate,up] -> [down] are taken in order, each Hessian collected with the
earlier subsets quantized (NEUQI.md). Only the block being quantized sits on the compute device.
Finished blocks are saved under `<out>.partial/`, so an interrupted run resumes where it stopped.
Under torch.distributed (distributed.py) each rank calibrates its share of the windows and quantizes the linears
it owns; the hooks here give the same master as one process.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .activations import Activations
from .activations import default_budget as default_activation_budget
from .archs import get_blocks, read_model_dir
from .calibration import StopForward as _StopForward
from .calibration import block_outputs as _block_outputs
from .calibration import capture_block_inputs
from .calibration import submodule as _submodule
from .calibration import to_device as _to
from . import distributed as _dist
from . import experts as _experts
from .atomic import atomic_directory
from .errors import UserError
from .gptq import GPTQFactor, weighted_error
from .hessian import HessianAccumulator
from .grids import LinearGrid, grid
from .master import EMBED, HEAD, QuantizedLinear
from .master_store import assemble, shard_name
from .partial import block_done, discard_stale, mark, partial_dir
from .partial import load_block as _load_block
from .partial import save_block as _save_block
from .replay import BlockReplay, default_budget
from .device import resolve_device  # noqa: F401 - callers import it from here too
from .timing import StageTimer
from .options import INIT_METHODS, SUPPORTED_BITS, USES_HDIAG, QuantizeOptions, QuantizeSummary  # noqa: F401

# the wall time per stage of the run that wrote a master, beside its config (the one file that differs run to run)
TIMING_FILE = "quantize_timing.json"
HEAD_FILE = "lm_head.safetensors"  # the quantized head's record in the partial dir until the master is written
PARTIAL_FORMAT = b"partial-2"  # the partial dir's layout (a master shard per block); older ones are discarded


def _fingerprint(model_dir: Path, opts: QuantizeOptions, calib_text: str | None) -> str:
    h = hashlib.sha256(json.dumps(asdict(opts), sort_keys=True).encode() + PARTIAL_FORMAT)
    h.update(str(model_dir.resolve()).encode())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    if calib_text is not None:
        h.update(hashlib.sha256(calib_text.encode()).digest())
    if opts.imatrix:
        h.update(hashlib.sha256(Path(opts.imatrix).read_bytes()).digest())
    return h.hexdigest()[:16]


def grid_of(name: str | None, opts: QuantizeOptions) -> LinearGrid:
    """The grid linear `name` is quantized on: its GGUF type's when opts.gguf_types names it (registered by
    converters.gguf), else the uniform opts.bits / opts.group_size grid fitted with opts.init."""
    if opts.gguf_types and name in opts.gguf_types:
        return grid("gguf", opts.gguf_types[name])
    return grid("uniform", opts.bits, opts.group_size, opts.init)


def quantize_linear(W: torch.Tensor, H: torch.Tensor | None, opts: QuantizeOptions, name: str | None = None,
                    importance: torch.Tensor | None = None, timer: StageTimer | None = None,
                    factor: GPTQFactor | None = None) -> tuple[object, dict, torch.Tensor]:
    """W quantized on grid_of(name, opts): parameters fitted on the original W, then GPTQ or round-to-nearest.
    importance: an imatrix h (n_in,) used as diag(H) when there is no H (damped like H); factor: GPTQFactor.of(H)
    shared by a subset. Returns (the grid's record, losses, dequantized W)."""
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
    rec, deq = grid_of(name, opts).quantize(W, H, hdiag, gptq=opts.gptq, act_order=opts.act_order, timer=timer,
                                            factor=factor)
    with timer.stage("loss"):
        losses = {"diag": float(((W.double() - deq.double()) ** 2 * hdiag.double()).sum())}
        losses["hessian"] = weighted_error(W, deq, H) if H is not None else losses["diag"]
    return rec, losses, deq


@torch.no_grad()
def _quantize_block(block, k: int, prefix: str, family, inputs: list, kwargs: dict, opts: QuantizeOptions, device,
                    bar, importance: dict | None = None, timer: StageTimer | None = None,
                    replay: BlockReplay | None = None) -> tuple[dict, dict]:
    """Quantize block k's linears subset by subset, each subset's H collected over `inputs` with the earlier
    subsets quantized; `replay` (if given) returns what earlier passes already computed (replay.py)."""
    timer = timer or StageTimer()
    records, losses = {}, {}
    world = _dist.current()
    plan = _dist.OwnerPlan(world)
    layers = tqdm(total=len(family.linear_names), desc=f"block {k} linears", unit="linear", leave=False,
                  disable=bar.disable)
    for done, subset in enumerate(family.subsets):
        first = _submodule(block, subset[0])
        owners = plan.assign({n: _submodule(block, n).weight.numel() for n in subset})  # alone: all rank 0's
        mine = [n for n in subset if owners[n] == world.rank]
        H = None
        if opts.calibrate:
            acc = HessianAccumulator(first.in_features, device=device) if not world.active else \
                _dist.OrderedHessian(world, first.in_features, opts.nsamples, bool(mine), device, timer)

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
        factor, results = None, {}
        if opts.gptq and H is not None:  # one inverse Cholesky per subset: its linears share H
            with timer.stage("gptq"):
                factor = GPTQFactor.of(H, opts.act_order, device)
        for name in mine:
            lin, full = _submodule(block, name), f"{prefix}.{k}.{name}"
            W = lin.weight.data.to(torch.float32)
            if not torch.isfinite(W).all():
                raise UserError(f"weight '{full}.weight' contains NaN/Inf; repair the model before quantizing")
            rec, loss, deq = quantize_linear(W, H, opts, full, None if importance is None else importance.get(full),
                                             timer=timer, factor=factor)
            lin.weight.data = deq.to(device, lin.weight.dtype)
            results[name] = (rec, loss, lin.weight.data)
        results = _dist.share_results(world, owners, results, timer)  # alone: as it is
        for name in subset:
            lin, full, (rec, loss, deq) = _submodule(block, name), f"{prefix}.{k}.{name}", results[name]
            lin.weight.data = deq.to(device, lin.weight.dtype)  # an owner's own: the same tensor
            records[full], losses[full] = rec, loss
            layers.set_postfix_str(f"{name} loss {loss['hessian']:.3g}")
            layers.update()
    layers.close()
    if family.experts is not None:  # every expert's gate/up/down on its own routed tokens (experts.py)
        recs, ls = _experts.quantize_experts(block, k, prefix, family, inputs, kwargs, opts, device, timer,
                                             quantize_linear, lambda H: GPTQFactor.of(H, opts.act_order, device))
        records.update(recs)
        losses.update(ls)
    return records, losses


@torch.no_grad()
def _quantize_head(model, family, hidden: list, opts: QuantizeOptions, device, partial: Path,
                   importance: dict | None, progress: bool, timer: StageTimer) -> tuple[QuantizedLinear, dict]:
    """Quantize the output head (`lm_head`; for tied embeddings the shared matrix) at opts.lm_head_bits with the
    body's group size, init and GPTQ, its H from the final norm's outputs on the last block's outputs `hidden`.
    Resumable: the record is kept in `partial` until the master is written. Across processes each rank adds its
    windows to the one H rank 0 collects (in window order), and the head is rank 0's: the others get (None, None)."""
    head_opts, world = replace(opts, bits=opts.lm_head_bits), _dist.current()
    if _dist.from_rank0(world, lambda: block_done(partial, HEAD_FILE), "head resume check"):
        if world.rank:
            return None, None
        recs, ls, _ = _load_block(partial, HEAD_FILE)
        return recs[HEAD], ls[HEAD]
    head = model.get_output_embeddings()
    W = head.weight.data.to(torch.float32)
    if not torch.isfinite(W).all():
        raise UserError("weight 'lm_head.weight' contains NaN/Inf; repair the model before quantizing")
    H = None
    if opts.calibrate:
        norm = _submodule(model, family.final_norm).to(device)
        acc = HessianAccumulator(W.shape[1], device=device) if not world.active else \
            _dist.OrderedHessian(world, W.shape[1], opts.nsamples, world.rank == 0, device, timer)
        for x in tqdm(hidden, desc="lm_head", unit="window", disable=not progress, leave=False):
            with timer.stage("calibration forward"):
                y = norm(x.to(device))
            with timer.stage("hessian"):
                acc.add(y)
        norm.to("cpu")
        H = acc.damped(opts.percdamp)
    if world.rank:
        return None, None
    imp = None if importance is None else importance.get(HEAD)
    rec, loss, _ = quantize_linear(W.to(device), H, head_opts, HEAD, imp, timer=timer)
    with timer.stage("write"):
        _save_block(partial, HEAD_FILE, {HEAD: rec}, {}, {HEAD: loss})
    return rec, loss


def quantize_model(model_dir, out, opts: QuantizeOptions, calib_text: str | None = None, device: str = "cpu",
                   force: bool = False, progress: bool = True, replay_budget: int | None = None,
                   importance: dict | None = None, activation_budget: int | None = None) -> QuantizeSummary:
    """Quantize the HF model in `model_dir` into a master checkpoint at `out` (atomic, resumable).
    importance: {linear name: h (n_in,)} from an importance matrix (opts.imatrix names its file), used as diag(H)
    where there is no calibration. activation_budget: bytes of calibration hidden states held in RAM (the rest
    spill to a file under `<out>.partial`; None: half the free memory); like replay_budget it changes no result.
    replay_budget: bytes for replayed sub-module outputs within a block (replay.py; 0 turns replay off; None:
    a quarter of the free memory). It changes no result, only the time."""
    from .data import calibration_windows, check_context
    from .lazy import open_model
    from .modeling import load_tokenizer

    timer = StageTimer()
    opts.validate()
    model_dir, hf_config, family = read_model_dir(model_dir)
    _experts.check_config(family, hf_config)
    if opts.calibrate:
        check_context(hf_config, opts.seqlen)
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    device = resolve_device(device)
    world = _dist.current()  # torch.distributed: this rank's share of the work (distributed.py); alone: rank 0 of 1
    _dist.check_supported(world, family, opts)
    progress = progress and world.rank == 0
    budget = default_budget(device) if replay_budget is None else int(replay_budget)
    if opts.calibrate and calib_text is None:
        raise UserError("no calibration text given; pass --calib FILE (or --no-calib for data-free init)")
    if opts.imatrix and importance is None:
        raise ValueError("opts.imatrix is set but no importance mapping was given (read it with "
                         "converters.gguf.imatrix.read_imatrix, as the CLI does)")
    with timer.stage("load"):
        source = open_model(model_dir)  # weights stay in their shards until a block is quantized (lazy.py)
        source.check_finite()
        model, config = source.model, json.loads((model_dir / "config.json").read_text())
        tokenizer = load_tokenizer(model_dir)
        blocks = get_blocks(model, family)
        prefix = family.blocks_path
        if opts.calibrate:
            windows = calibration_windows(tokenizer, calib_text, opts.nsamples, opts.seqlen, seed=opts.seed)
            windows = windows[world.rank :: world.size]  # rank r takes windows r, r + N, ...
        else:
            windows = torch.zeros(1, 2, dtype=torch.long)  # one tiny window: only shapes flow, no H is collected

    partial = partial_dir(out)
    fp = _fingerprint(model_dir, opts, calib_text)
    if world.rank == 0:  # the one writer of the partial dir and the master
        discard_stale(partial, fp)
        mark(partial, fp, asdict(opts))
        for stale in partial.glob(".activations-*.bin"):  # spill files of a killed run
            stale.unlink()
    _dist.barrier(world, "waiting for rank 0 to prepare the partial dir")
    act_budget = default_activation_budget() if activation_budget is None else int(activation_budget)

    def new_store():  # the windows' hidden states: RAM up to the budget, then a spill file in the partial dir
        return Activations(act_budget, partial, "activations")

    with timer.stage("calibration forward"):
        source.materialize(family.embed)
        inputs, block_kwargs = capture_block_inputs(model, blocks, windows, device,
                                                    progress=progress and opts.calibrate, store=new_store())
        block_kwargs = _to(block_kwargs, device)  # one copy of each table shared by several blocks
        source.release(family.embed)

    n_shards = len(blocks) + 1  # one master shard per block, then the rest (master_store.py)
    fused = _experts.fused_tensor_names(family, config)  # MoE: held per expert in the records, never fused
    modules, losses, resumed, head = {}, {}, 0, {}
    bar = tqdm(range(len(blocks)), desc="blocks", unit="block", disable=not progress)
    for k in bar:
        with timer.stage("load"):
            block = source.materialize(f"{prefix}.{k}").to(device)
        shard = shard_name(k + 1, n_shards)
        replay = None
        if _dist.from_rank0(world, lambda: block_done(partial, shard), "resume check"):  # finished in an earlier
            with timer.stage("resume"):  # run: its records, and the block's outputs recomputed
                recs, ls, mods = _dist.from_rank0(world, lambda: _load_block(partial, shard), f"block {k}'s records")
                for n, rec in recs.items():
                    _experts.set_weight(block, n[len(f"{prefix}.{k}.") :], rec.dequantize())
            resumed += 1
        else:
            if opts.calibrate and budget > 0:
                replay = BlockReplay(block, family.subsets, len(inputs), budget)
            recs, ls = _quantize_block(block, k, prefix, family, inputs, block_kwargs[k], opts, device, bar,
                                       importance, timer, replay)
            with timer.stage("write"):  # the block's master shard (rank 0's to write): never held again
                own = {} if world.rank else source.tensors(
                    skip=set(recs) | fused, select=lambda n, b=f"{prefix}.{k}.": n.startswith(b) and n not in fused)
                mods = {} if world.rank else _save_block(partial, shard, recs, own, ls)
        modules.update(mods)
        losses.update(ls)
        if k + 1 < len(blocks) or opts.lm_head_bits is not None:
            with timer.stage("calibration forward"):
                done_inputs = inputs
                inputs = _block_outputs(block, inputs, block_kwargs[k], device, replay, len(family.subsets),
                                        out=new_store())
                if isinstance(done_inputs, Activations):
                    done_inputs.close()
        elif replay is not None:
            replay.close()
        del recs
        blocks[k] = block.to("cpu")
        source.release(f"{prefix}.{k}")
    tied = bool(config.get("tie_word_embeddings", False))
    if opts.lm_head_bits is not None:
        source.materialize(family.final_norm)
        source.materialize(family.head)
        rec, loss = _quantize_head(model, family, inputs, opts, device, partial, importance,
                                   progress=not bar.disable, timer=timer)
        if rec is not None:  # across processes: rank 0's
            head[HEAD], losses[HEAD] = rec, loss

    summary = lambda: QuantizeSummary(  # noqa: E731
        seconds=timer.total(), layers=len(losses),
        diag_loss=sum(v["diag"] for v in losses.values()), hessian_loss=sum(v["hessian"] for v in losses.values()),
        resumed_blocks=resumed, per_layer=losses, timing=timer.report(),
    )
    if world.active:  # the other ranks' spill files closed before rank 0 removes the partial dir
        if isinstance(inputs, Activations) and world.rank:
            inputs.close()
        _dist.barrier(world, "waiting for every rank to finish its blocks")
        if world.rank:
            return summary()
    in_blocks = tuple(f"{prefix}.{k}." for k in range(len(blocks)))
    with timer.stage("load"):
        rest = source.tensors(skip=set(modules) | set(head) | fused,
                              select=lambda n: not n.startswith(in_blocks) and n not in fused)
    if tied:
        rest.pop("lm_head.weight", None)
        if head:  # the one shared matrix: the embedding is the quantized head, derived on load
            rest.pop(EMBED, None)
    qcfg = {"quant_method": "neuqi", "bits": opts.bits, "group_size": opts.group_size, "init": opts.init,
            "gptq": opts.gptq, "act_order": opts.act_order, "static_groups": True, "nsamples": opts.nsamples,
            "seqlen": opts.seqlen, "seed": opts.seed, "percdamp": opts.percdamp, "calibrated": opts.calibrate,
            "imatrix": Path(opts.imatrix).name if opts.imatrix else None, "gguf_lattice": bool(opts.gguf_types)}
    if head:
        qcfg["lm_head"] = {"bits": opts.lm_head_bits, "tied_embedding": tied}
    # what an exporter needs of transformers' module tree (compressed-tensors' ignore list), so export builds no model
    qcfg["linear_modules"] = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with atomic_directory(out, overwrite=force) as tmp:  # the timing file too: a killed run leaves all or nothing
        with timer.stage("write"):
            assemble(tmp, partial, n_shards, head, rest, {**config, "quantization_config": {**qcfg, "modules": modules}},
                     model_dir)
        times = timer.ordered()
        (tmp / TIMING_FILE).write_text(json.dumps({"seconds": {k: round(v, 3) for k, v in times.items()},
                                                   "total": round(timer.total(), 3), "device": str(device),
                                                   "threads": torch.get_num_threads()}, indent=1) + "\n")
    if isinstance(inputs, Activations):
        inputs.close()
    shutil.rmtree(partial, ignore_errors=True)
    return summary()
