"""Lightweight distillation of a master checkpoint against the original model (NEUQI.md, last section).

Frozen: the integer codes, the embeddings, the lm_head and a mixture-of-experts router (float). Trained: every
per-group scale and float zero-point (each expert's too: distill_experts.py), the norm weights and the biases.
Loss: MSE between the final hidden states (after the final norm, before lm_head) of the teacher (the original HF model) and the student (the master,
dequantized on the fly), averaged over tokens and features. AdamW (β 0.9/0.95, no weight decay),
batch 1, cosine schedule with 10% linear warm-up.

Memory: a quantized linear keeps only its uint8 codes and dequantizes inside a custom autograd
function (the float weight is rebuilt in backward, never stored); decoder blocks are gradient
checkpointed when the activations would be large. Teacher targets are computed once into a float32
memmap under `<out>.partial/`, with the windows and periodic training checkpoints, so a killed run
resumes where it stopped; the result is an ordinary master checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .atomic import atomic_file
from .errors import UserError
from .master import HEAD, MasterCheckpoint, QuantizedLinear
from .partial import discard_stale, mark, partial_dir
from .quant.grid import dequantize, expand_groups, n_groups
from .train_state import load_state, save_state

PAPER = dict(nsamples=256, seqlen=2048)  # reference settings (one GPU, bf16)
CPU = dict(nsamples=64, seqlen=512)  # lowered automatically on CPU
MATCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
              "num_attention_heads", "num_key_value_heads")


@dataclass
class DistillOptions:
    """Training settings; None = the paper's value on CUDA, a lowered one on CPU (see `resolve`)."""

    nsamples: int | None = None
    seqlen: int | None = None
    steps: int | None = None  # default: one epoch (= nsamples)
    lr: float = 3e-4
    warmup: float = 0.1
    seed: int = 0
    checkpoint_every: int = 20  # steps between resumable checkpoints (also every 5 minutes)
    grad_checkpointing: bool | None = None  # None: on when the activations would be large

    def resolve(self, device: torch.device) -> "DistillOptions":
        """A copy with every None filled in for `device`, validated."""
        base = PAPER if device.type == "cuda" else CPU
        o = copy.copy(self)
        o.nsamples = base["nsamples"] if o.nsamples is None else o.nsamples
        o.seqlen = base["seqlen"] if o.seqlen is None else o.seqlen
        o.steps = o.nsamples if o.steps is None else o.steps
        for name, flag in (("nsamples", "--nsamples"), ("seqlen", "--seqlen"), ("steps", "--steps")):
            v = getattr(o, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if name == "seqlen" else 1):
                raise UserError(f"{flag} must be an integer >= {2 if name == 'seqlen' else 1}, got {v!r}; pass a larger {flag}")
        if not (isinstance(o.lr, (int, float)) and math.isfinite(o.lr) and o.lr > 0):
            raise UserError(f"--lr must be a positive number, got {o.lr!r}; the paper uses 3e-4")
        if not 0 <= o.warmup < 1:
            raise UserError(f"warm-up fraction must be in [0, 1), got {o.warmup!r}")
        if o.checkpoint_every < 1:
            raise UserError(f"checkpoint_every must be >= 1, got {o.checkpoint_every!r}")
        return o


@dataclass
class DistillSummary:
    seconds: float
    steps: int
    first_loss: float  # mean MSE over the first 10% of steps
    last_loss: float  # mean MSE over the last 10% of steps
    nsamples: int
    seqlen: int
    resumed_at: int = 0  # step the run resumed from (0 = fresh)

    def __str__(self) -> str:
        return (f"distilled {self.steps} steps ({self.nsamples} windows × {self.seqlen} tokens) in {self.seconds:.1f} s; "
                f"hidden-state MSE {self.first_loss:.4g} (first 10% of steps) -> {self.last_loss:.4g} (last 10%)"
                + (f" (resumed at step {self.resumed_at})" if self.resumed_at else ""))


def _group_sum(t: torch.Tensor, group_size: int, ng: int) -> torch.Tensor:
    """(out, in) -> (out, ng): sums over each group of input columns (the last one may be short)."""
    idx = torch.arange(t.shape[1], device=t.device) // group_size
    return t.new_zeros(t.shape[0], ng).index_add_(1, idx, t)


class _DequantLinear(torch.autograd.Function):
    """y = x @ (s * (q - Z))ᵀ + b, with the float weight rebuilt in backward instead of saved."""

    @staticmethod
    def forward(ctx, x, codes, scale, zero, bias, group_size):
        w = dequantize(codes, scale, zero, group_size).to(x.dtype)
        ctx.save_for_backward(x, codes, scale, zero)
        ctx.group_size, ctx.has_bias, ctx.x_dtype = group_size, bias is not None, x.dtype
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, gy):
        x, codes, scale, zero = ctx.saved_tensors
        gs, (out, inp) = ctx.group_size, codes.shape
        gx = g_scale = g_zero = g_bias = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ dequantize(codes, scale, zero, gs).to(gy.dtype)).to(ctx.x_dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            gw = gy.reshape(-1, out).t().float() @ x.reshape(-1, inp).float()  # (out, in)
            ng = n_groups(inp, gs)
            if ctx.needs_input_grad[2]:
                g_scale = _group_sum(gw * (codes.float() - expand_groups(zero.float(), inp, gs)), gs, ng).to(scale.dtype)
            if ctx.needs_input_grad[3]:
                g_zero = (-_group_sum(gw, gs, ng) * scale.float()).to(zero.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            g_bias = gy.reshape(-1, out).float().sum(0)
        return gx, None, g_scale, g_zero, g_bias, None


class QuantLinear(torch.nn.Module):
    """A linear held as frozen uint8 codes with trainable per-group scale and float zero-point."""

    def __init__(self, rec: QuantizedLinear, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", rec.codes.clone())
        self.scale = torch.nn.Parameter(rec.scale.float().clone())
        self.zero = torch.nn.Parameter(rec.zero.float().clone())
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float().clone())
        self.group_size = rec.effective_group_size
        self.out_features, self.in_features = rec.shape

    def forward(self, x):
        return _DequantLinear.apply(x, self.codes, self.scale, self.zero, self.bias, self.group_size)


def build_student(master: MasterCheckpoint):
    """The master as a transformers model whose quantized linears are QuantLinear; sets requires_grad."""
    from .archs import family_for
    from .distill_experts import install
    from .modeling import master_to_hf

    model = master_to_hf(master)
    # mixture of experts: each expert's gate/up/down a QuantLinear of its own, the router float (frozen)
    experts = install(model, master, family_for(master.config), lambda rec: QuantLinear(rec, None))
    for name, rec in master.linears.items():
        if name == HEAD or name in experts:
            continue  # a quantized lm_head stays frozen (NEUQI.md): its dequantized weights, as master_to_hf set them
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, attr)
        setattr(parent, attr, QuantLinear(rec, old.bias))
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".scale", ".zero", ".bias")) or
                         (name.endswith(".weight") and "norm" in name.rsplit(".", 2)[-2]))
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """name -> parameter, in a fixed order, of everything distillation trains."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def lr_lambda(steps: int, warmup: float):
    """Linear warm-up over `warmup`·steps, then cosine decay to 0 at the last step."""
    warm = max(1, round(warmup * steps)) if warmup > 0 else 0

    def f(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        span = max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(t - warm, span) / span))

    return f


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _teacher_fingerprint(teacher_dir: Path, text: str, opts: DistillOptions) -> str:
    """What the teacher targets depend on: the teacher, the text and the windows drawn from it."""
    h = hashlib.sha256(json.dumps([opts.nsamples, opts.seqlen, opts.seed]).encode())
    h.update(str(teacher_dir.resolve()).encode())
    for f in sorted(teacher_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()[:16]


def _fingerprint(master_dir: Path, teacher_fp: str, opts: DistillOptions) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in asdict(opts).items() if k != "checkpoint_every"},
                                  sort_keys=True).encode())
    from .master_store import weight_files

    for f in weight_files(master_dir):
        h.update(_file_digest(f).encode())
    h.update(teacher_fp.encode())
    return h.hexdigest()[:16]


def _check_teacher(master: MasterCheckpoint, teacher_cfg: dict, teacher_dir: Path) -> None:
    for k in MATCH_KEYS:
        a, b = master.config.get(k), teacher_cfg.get(k)
        if a != b:
            raise UserError(f"teacher '{teacher_dir}' does not match the master ({k} {b!r} vs {a!r}); "
                            f"pass the original model the master was quantized from as --teacher")


@torch.no_grad()
def teacher_targets(teacher_dir: Path, windows: torch.Tensor, partial: Path, hidden: int, device,
                    progress: bool) -> np.memmap:
    """float32 memmap (n, seqlen, hidden) of the teacher's final hidden states; resumes a partial cache."""
    path, done_file = partial / "teacher.f32", partial / "teacher.json"
    n, L = windows.shape
    done = json.loads(done_file.read_text())["done"] if done_file.exists() and path.exists() else 0
    mm = np.memmap(path, dtype=np.float32, mode="r+" if done else "w+", shape=(n, L, hidden))
    if done < n:
        from .modeling import load_hf_model

        model = load_hf_model(teacher_dir)[0].model.to(device)
        for i in tqdm(range(done, n), desc="teacher targets", unit="window", disable=not progress, leave=False):
            h = model(input_ids=windows[i:i + 1].to(device), use_cache=False).last_hidden_state
            mm[i] = h[0].float().cpu().numpy()
            if (i + 1) % 8 == 0 or i + 1 == n:
                mm.flush()
                done_file.write_text(json.dumps({"done": i + 1}))
        del model
    return np.memmap(path, dtype=np.float32, mode="r", shape=(n, L, hidden))


def _window_order(n: int, steps: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(n, generator=g).tolist())
    return order[:steps]


def _save_ckpt(path: Path, step: int, params: dict, opt, sched, losses: list) -> None:
    with atomic_file(path) as tmp:
        save_state({"step": step, "params": {n: p.detach().cpu().clone() for n, p in params.items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "losses": losses}, tmp)


def _use_grad_checkpointing(opts: DistillOptions, cfg: dict) -> bool:
    if opts.grad_checkpointing is not None:
        return opts.grad_checkpointing
    # rough float32 activation bytes kept for backward without checkpointing
    per_token = 4 * 12 * (cfg.get("hidden_size", 0) + cfg.get("intermediate_size", 0))
    return opts.seqlen * cfg.get("num_hidden_layers", 1) * per_token > (2 << 30)


def distilled_master(master: MasterCheckpoint, params: dict, info: dict) -> MasterCheckpoint:
    """A new master: same codes, the trained scales/zeros, norm weights and biases."""
    linears, tensors = {}, dict(master.tensors)
    for name, rec in master.linears.items():
        if name == HEAD:
            linears[name] = rec  # frozen
            continue
        linears[name] = QuantizedLinear(rec.codes, params[f"{name}.scale"].detach().float().cpu().clone(),
                                        params[f"{name}.zero"].detach().float().cpu().clone(),
                                        rec.bits, rec.group_size, rec.hdiag)
    for name, p in params.items():
        if not name.endswith((".scale", ".zero")):
            if name not in tensors:
                raise RuntimeError(f"trained tensor {name} has no place in the master")
            tensors[name] = p.detach().to(tensors[name].dtype).cpu().clone()
    config = copy.deepcopy(master.config)
    config["quantization_config"]["distill"] = info
    return MasterCheckpoint(config=config, linears=linears, tensors=tensors, tokenizer_dir=master.tokenizer_dir)


def distill(master_dir, teacher_dir, text: str, out, opts: DistillOptions | None = None, device: str = "auto",
            force: bool = False, progress: bool = True, callback=None, targets_dir=None) -> DistillSummary:
    """Distil the master at `master_dir` against `teacher_dir` on `text`; write a master at `out` (resumable).

    `callback(step, loss)` is called after every optimizer step (tests use it to interrupt a run).
    `targets_dir`: keep the teacher targets there (keyed by teacher, text and windows) to share them between
    runs, e.g. several masters of one model; default: inside `<out>.partial`, removed at the end.
    """
    from transformers import AutoTokenizer

    from .archs import read_model_dir
    from .data import calibration_windows, check_context
    from .pipeline import resolve_device

    t0 = time.time()
    dev = resolve_device(device)
    opts = (opts or DistillOptions()).resolve(dev)
    master_dir, out = Path(master_dir), Path(out)
    if out.exists() and not force:
        raise UserError(f"output '{out}' already exists; choose another -o or pass --force")
    if out.resolve() == master_dir.resolve():
        raise UserError(f"output '{out}' is the input master; choose another -o")
    master = MasterCheckpoint.load(master_dir)
    master.require_uniform("distillation")
    teacher_dir, teacher_cfg, _ = read_model_dir(teacher_dir)
    _check_teacher(master, teacher_cfg, teacher_dir)
    check_context(master.config, opts.seqlen)

    partial = partial_dir(out)
    tfp = _teacher_fingerprint(teacher_dir, text, opts)
    fp = _fingerprint(master_dir, tfp, opts)
    discard_stale(partial, fp)
    tdir = partial if targets_dir is None else Path(targets_dir) / f"targets-{tfp}"
    win_file = tdir / "windows.safetensors"
    if win_file.exists():
        windows = load_state(win_file)
    else:  # tokenize (and fail on short text) before anything is written
        tok = AutoTokenizer.from_pretrained(str(teacher_dir))
        windows = calibration_windows(tok, text, opts.nsamples, opts.seqlen, seed=opts.seed)
        tdir.mkdir(parents=True, exist_ok=True)
        with atomic_file(win_file) as tmp:
            save_state(windows, tmp)
    mark(partial, fp, asdict(opts))
    hidden = int(master.config["hidden_size"])
    targets = teacher_targets(teacher_dir, windows, tdir, hidden, dev, progress)

    model = build_student(master).to(dev)
    params = trainable(model)
    opt = torch.optim.AdamW(list(params.values()), lr=opts.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(opts.steps, opts.warmup))
    ckpt_file, start, losses = partial / "train.safetensors", 0, []
    if ckpt_file.exists():
        ck = load_state(ckpt_file)
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(ck["params"][n])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        start, losses = ck["step"], ck["losses"]
    if _use_grad_checkpointing(opts, master.config):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    inner, scales = model.model, [p for n, p in params.items() if n.endswith(".scale")]
    order = _window_order(windows.shape[0], opts.steps, opts.seed)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    bar = tqdm(total=opts.steps, initial=start, desc="distill", unit="step", disable=not progress)
    last_save, running = time.time(), (sum(losses[-20:]) / len(losses[-20:]) if losses else None)
    try:
        for step in range(start, opts.steps):
            i = order[step]
            target = torch.from_numpy(np.array(targets[i])).to(dev)
            with torch.autocast(**amp):
                h = inner(input_ids=windows[i:i + 1].to(dev), use_cache=False).last_hidden_state
            loss = F.mse_loss(h[0].float(), target)
            if not torch.isfinite(loss):
                raise UserError(f"distillation diverged at step {step} (loss {loss.item()}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                for s in scales:
                    s.clamp_(min=1e-8)  # a scale must stay positive for every exporter
            losses.append(loss.item())
            running = losses[-1] if running is None else 0.9 * running + 0.1 * losses[-1]
            bar.update()
            bar.set_postfix(loss=f"{running:.4g}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if (step + 1) % opts.checkpoint_every == 0 or time.time() - last_save > 300:
                _save_ckpt(ckpt_file, step + 1, params, opt, sched, losses)
                last_save = time.time()
            if callback is not None:
                callback(step, losses[-1])
    finally:
        bar.close()
    k = max(1, len(losses) // 10)
    summary = DistillSummary(seconds=time.time() - t0, steps=opts.steps, first_loss=float(np.mean(losses[:k])),
                             last_loss=float(np.mean(losses[-k:])), nsamples=opts.nsamples, seqlen=opts.seqlen,
                             resumed_at=start)
    info = {"nsamples": opts.nsamples, "seqlen": opts.seqlen, "steps": opts.steps, "lr": opts.lr,
            "warmup": opts.warmup, "seed": opts.seed, "first_loss": summary.first_loss, "last_loss": summary.last_loss}
    del targets
    distilled_master(master, params, info).save(out, overwrite=force)
    shutil.rmtree(partial, ignore_errors=True)
    return summary
