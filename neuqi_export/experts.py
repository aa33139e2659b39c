"""Mixture-of-experts blocks: every expert's gate, up and down quantized as linears of their own, each on the
calibration tokens the router sends to it.

transformers 5 keeps a block's experts as fused 3-D parameters of the family's experts module (`Family.experts`,
e.g. `mlp.experts`): `gate_up_proj` (E, 2I, H) -- rows [0, I) the gate, [I, 2I) the up projection -- and `down_proj`
(E, H, I). The master records them per expert as ordinary linears named `<block>.<experts>.<e>.gate_proj`,
`.up_proj`, `.down_proj` (the per-expert names of the original checkpoints, which mlx-lm and compressed-tensors
read); `fuse_state_dict` rebuilds the fused parameters for a transformers model.

Routing is captured from the model's own forward: a pre-hook on the experts module sees the tokens and the router's
top-k indices exactly as the model computed them (the router stays float). Pass 1 collects each expert's
H = X_eᵀX_e / N_e of the tokens routed to it (gate and up share it), pass 2 the H of its own intermediate
activations act(gate x)·(up x) with gate/up already quantized (down).

Fallback: an expert that received fewer than MIN_EXPERT_TOKENS tokens is fitted on ALL the calibration tokens that
entered the block's experts module, pushed through that expert (gate/up: X_allᵀX_all / N; down: that expert's own
activations of every token), damped as any H. The losses of each expert record its token count and whether the
fallback was used, so a resumed run reports the same.
"""
from __future__ import annotations

import re

import torch

from .calibration import StopForward, submodule
from .errors import UserError
from .hessian import HessianAccumulator

PARTS = ("gate_proj", "up_proj", "down_proj")
MIN_EXPERT_TOKENS = 8
_EXPERT_KEY = re.compile(r"^(.*)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def num_experts(config: dict) -> int:
    """Experts per MoE block, from num_local_experts / num_experts / n_routed_experts (the first present)."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if config.get(key):
            return int(config[key])
    raise UserError(f"{config.get('model_type')}: the config names no expert count (num_local_experts / num_experts); "
                    "the config is broken")


def check_config(family, config: dict) -> None:
    """UserError for an MoE model whose blocks are not all MoE blocks (qwen3_moe mlp_only_layers / sparse step)."""
    if family.experts is None:
        return
    if config.get("mlp_only_layers") or int(config.get("decoder_sparse_step") or 1) != 1:
        raise UserError(f"{family.model_type}: models mixing dense and MoE blocks (mlp_only_layers / decoder_sparse_step)"
                        " are not supported yet; quantize a model whose every block is MoE")


def expert_names(family, config: dict) -> list[str]:
    """The per-expert linears of one block (names inside the block), expert by expert."""
    if family.experts is None:
        return []
    return [f"{family.experts}.{e}.{p}" for e in range(num_experts(config)) for p in PARTS]


def fused_tensor_names(family, config: dict) -> set[str]:
    """The fused state-dict names (`<blocks>.<i>.<experts>.gate_up_proj` / `.down_proj`) the master stores per expert."""
    if family.experts is None:
        return set()
    n = int(config["num_hidden_layers"])
    return {f"{family.blocks_path}.{i}.{family.experts}.{p}" for i in range(n) for p in ("gate_up_proj", "down_proj")}


def split_expert(gate_up: torch.Tensor, down: torch.Tensor, e: int) -> dict[str, torch.Tensor]:
    """Expert e's {gate_proj, up_proj, down_proj} (out, in) matrices from the fused parameters."""
    inter = gate_up.shape[1] // 2
    return {"gate_proj": gate_up[e, :inter], "up_proj": gate_up[e, inter:], "down_proj": down[e]}


def fuse_state_dict(sd: dict) -> dict:
    """A state dict with per-expert `<x>.<e>.{gate,up,down}_proj.weight` replaced by transformers 5's fused
    `<x>.gate_up_proj` (E, 2I, H) and `<x>.down_proj` (E, H, I)."""
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for k, v in sd.items():
        m = _EXPERT_KEY.match(k)
        if m and m.group(1).endswith("experts"):
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k] = v
    for base, per in groups.items():
        es = sorted(per)
        if es != list(range(len(es))) or any(len(per[e]) != 3 for e in es):
            raise UserError(f"{base}: the master's experts are incomplete; re-run quantize")
        out[f"{base}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate_proj"], per[e]["up_proj"]]) for e in es])
        out[f"{base}.down_proj"] = torch.stack([per[e]["down_proj"] for e in es])
    return out


def set_weight(block, name: str, W: torch.Tensor) -> None:
    """Write W as the weight of `name` inside the block: a linear's, or an expert's slice of the fused parameters."""
    parts = name.split(".")
    if parts[-1] in PARTS and parts[-2].isdigit():
        mod, e = submodule(block, ".".join(parts[:-2])), int(parts[-2])
        inter = mod.gate_up_proj.shape[1] // 2
        target = {"gate_proj": mod.gate_up_proj.data[e, :inter], "up_proj": mod.gate_up_proj.data[e, inter:],
                  "down_proj": mod.down_proj.data[e]}[parts[-1]]
        target.copy_(W.to(target.device, target.dtype))
        return
    lin = submodule(block, name)
    lin.weight.data = W.to(lin.weight.device, lin.weight.dtype)


def _run(block, inputs: list, kwargs: dict, device) -> None:
    for x in inputs:
        try:
            block(x.to(device), **kwargs)
        except StopForward:
            pass


@torch.no_grad()
def collect_gate_up(block, family, inputs: list, kwargs: dict, device) -> tuple[list, HessianAccumulator]:
    """(one HessianAccumulator per expert over the tokens routed to it, one over every token entering the experts)."""
    mod = submodule(block, family.experts)
    n_exp, hidden = mod.gate_up_proj.shape[0], mod.gate_up_proj.shape[2]
    accs = [HessianAccumulator(hidden, device=device) for _ in range(n_exp)]
    every = HessianAccumulator(hidden, device=device)

    def hook(module, args):
        x, idx = args[0], args[1]
        every.add(x)
        for e in range(n_exp):
            sel = (idx == e).any(-1)
            if sel.any():
                accs[e].add(x[sel])
        raise StopForward

    _run_hooked(mod, hook, block, inputs, kwargs, device)
    return accs, every


def _run_hooked(mod, hook, block, inputs: list, kwargs: dict, device) -> None:
    """Run the block's calibration inputs with forward pre-hook `hook` on its experts module `mod`."""
    handle = mod.register_forward_pre_hook(hook)
    try:
        _run(block, inputs, kwargs, device)
    finally:
        handle.remove()


@torch.no_grad()
def collect_down(block, family, inputs: list, kwargs: dict, device, everything: set) -> list:
    """One HessianAccumulator per expert over its intermediate activations act(gate x)·(up x) (with the current
    gate/up weights) of the tokens routed to it, or of every token for the experts in `everything`."""
    mod = submodule(block, family.experts)
    n_exp, inter = mod.down_proj.shape[0], mod.down_proj.shape[2]
    accs = [HessianAccumulator(inter, device=device) for _ in range(n_exp)]

    def hook(module, args):
        x, idx = args[0], args[1]
        for e in range(n_exp):
            xe = x if e in everything else x[(idx == e).any(-1)]
            if xe.shape[0]:
                gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e]).chunk(2, dim=-1)
                accs[e].add(module.act_fn(gate) * up)
        raise StopForward

    _run_hooked(mod, hook, block, inputs, kwargs, device)
    return accs


@torch.no_grad()
def quantize_experts(block, k: int, prefix: str, family, inputs: list, kwargs: dict, opts, device, timer,
                     quantize_linear, factor_of) -> tuple[dict, dict]:
    """Quantize every expert's gate/up (on its routed tokens' H) then down (on its activations' H); returns
    (records, losses) keyed `<prefix>.<k>.<experts>.<e>.<part>`, losses carrying 'tokens' and 'fallback'."""
    mod = submodule(block, family.experts)
    n_exp = mod.gate_up_proj.shape[0]
    base = f"{prefix}.{k}.{family.experts}"
    records, losses = {}, {}
    if opts.calibrate:
        with timer.stage("calibration forward"):
            accs, every = collect_gate_up(block, family, inputs, kwargs, device)
    tokens = [a.count for a in accs] if opts.calibrate else [0] * n_exp
    fallback = {e for e in range(n_exp) if opts.calibrate and tokens[e] < MIN_EXPERT_TOKENS}

    def run(e: int, parts: tuple, H) -> None:
        factor = factor_of(H) if (opts.gptq and H is not None) else None
        for part in parts:
            name = f"{base}.{e}.{part}"
            W = split_expert(mod.gate_up_proj.data, mod.down_proj.data, e)[part].to(torch.float32)
            if not torch.isfinite(W).all():
                raise UserError(f"weight '{name}' contains NaN/Inf; repair the model before quantizing")
            rec, loss, deq = quantize_linear(W, H, opts, name, None, timer=timer, factor=factor)
            set_weight(block, f"{family.experts}.{e}.{part}", deq)
            records[name], losses[name] = rec, {**loss, "tokens": tokens[e], "fallback": e in fallback}

    for e in range(n_exp):
        H = None
        if opts.calibrate:
            H = (every if e in fallback else accs[e]).damped(opts.percdamp)
        run(e, ("gate_proj", "up_proj"), H)
    if opts.calibrate:
        del accs, every
        with timer.stage("calibration forward"):
            down = collect_down(block, family, inputs, kwargs, device, fallback)
    for e in range(n_exp):
        run(e, ("down_proj",), down[e].damped(opts.percdamp) if opts.calibrate else None)
    return records, losses


def fallback_summary(losses: dict) -> str:
    """One line: how many experts were fitted on the fallback H, and every expert's token count range."""
    downs = {n: v for n, v in losses.items() if n.endswith(".down_proj") and "tokens" in v}
    if not downs:
        return ""
    counts = [int(v["tokens"]) for v in downs.values()]
    fell = sorted((n.rsplit(".", 1)[0], int(v["tokens"])) for n, v in downs.items() if v.get("fallback"))
    line = (f"experts: {len(downs)}, calibration tokens per expert {min(counts)}..{max(counts)}; "
            f"{len(fell)} with < {MIN_EXPERT_TOKENS} tokens fitted on every token of their block")
    if fell:
        line += " (" + ", ".join(f"{n}: {t}" for n, t in fell[:8]) + (", ..." if len(fell) > 8 else "") + ")"
    return line


def checkpoint_tensor(family, name: str, shards) -> torch.Tensor | None:
    """State-dict tensor `name` built from a checkpoint that names experts per expert (and the router after the
    family's checkpoint names: `Family.experts_ckpt`, `router_ckpt`); None where `name` is stored as it is."""
    if family.experts is None or name in shards:
        return None
    m = re.match(rf"^(.*\.\d+)\.{re.escape(family.experts)}\.(gate_up_proj|down_proj)$", name)
    if m:
        block, fused = m.groups()
        path, gate, up, down = family.experts_ckpt
        e, out = 0, []
        while f"{block}.{path}.{e}.{down}.weight" in shards:
            parts = (gate, up) if fused == "gate_up_proj" else (down,)
            out.append(torch.cat([shards.read(f"{block}.{path}.{e}.{p}.weight") for p in parts]))
            e += 1
        return torch.stack(out) if out else None
    m = re.match(rf"^(.*\.\d+)\.{re.escape(family.router)}\.(weight|bias)$", name)
    if m and f"{m.group(1)}.{family.router_ckpt}.{m.group(2)}" in shards:
        return shards.read(f"{m.group(1)}.{family.router_ckpt}.{m.group(2)}")
    return None


def is_expert(family, name: str) -> bool:
    """Is `name` one of the per-expert linears the master records?"""
    return family.experts is not None and re.match(rf"^.*\.\d+\.{re.escape(family.experts)}\.\d+\.\w+$", name) is not None
