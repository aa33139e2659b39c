"""Mixture-of-experts blocks in the distillation student: every expert's gate, up and down as a QuantLinear of its
own (frozen codes, trainable scales and zero-points, as the dense linears), the router float and frozen.

transformers 5 keeps a block's experts as fused 3-D parameters; the student replaces that module
(`Family.experts`, e.g. `mlp.experts`) by `QuantExperts`, whose children are named `<e>.gate_proj` / `.up_proj` /
`.down_proj`, so every trained parameter is named `<block>.<experts>.<e>.<part>.scale` / `.zero` after the master's
per-expert records (neuqi_export/experts.py) and `distill.distilled_master` writes them back unchanged. Its forward
computes what transformers' eager experts do (MixtralExperts / Qwen3MoeExperts): each expert on the tokens the
router sent to it, weighted by their routing weights, summed into place.
"""
from __future__ import annotations

import torch

from .calibration import submodule
from .errors import UserError
from .experts import PARTS


class QuantExperts(torch.nn.ModuleList):
    """The experts of one block: a ModuleDict {gate_proj, up_proj, down_proj} of QuantLinear per expert."""

    def __init__(self, experts: list, act_fn):
        super().__init__([torch.nn.ModuleDict(parts) for parts in experts])
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """(tokens, hidden) -> (tokens, hidden): the sum over each token's top-k experts of its routing weight
        times down(act(gate x) · up x)."""
        out = torch.zeros_like(hidden_states)
        for e, ex in enumerate(self):
            token_idx, pos = torch.where(top_k_index == e)
            if token_idx.numel() == 0:
                continue  # no token for this expert in this window: its scales get no gradient from it
            x = hidden_states[token_idx]
            y = ex["down_proj"](self.act_fn(ex["gate_proj"](x)) * ex["up_proj"](x))
            out = out.index_add(0, token_idx, (y * top_k_weights[token_idx, pos, None]).to(out.dtype))
        return out


def install(model, master, family, quant_linear) -> set:
    """Replace every block's fused experts module of `model` (master_to_hf of `master`) by a QuantExperts built
    from the master's per-expert records with `quant_linear(record)`; returns the expert linears' names handled."""
    if family.experts is None:
        return set()
    done = set()
    blocks = model.get_submodule(family.blocks_path)
    for i, block in enumerate(blocks):
        old = submodule(block, family.experts)
        n_exp = int(old.gate_up_proj.shape[0])
        base = f"{family.blocks_path}.{i}.{family.experts}"
        experts = []
        for e in range(n_exp):
            names = {p: f"{base}.{e}.{p}" for p in PARTS}
            missing = [n for n in names.values() if n not in master.linears]
            if missing:
                raise UserError(f"master checkpoint has no linear '{missing[0]}'; re-run quantize")
            experts.append({p: quant_linear(master.linears[n]) for p, n in names.items()})
            done.update(names.values())
        parent_name, _, attr = family.experts.rpartition(".")
        parent = submodule(block, parent_name) if parent_name else block
        setattr(parent, attr, QuantExperts(experts, old.act_fn).to(old.gate_up_proj.device))
    return done
