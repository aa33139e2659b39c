"""Mixture-of-experts blocks in GGUF: the master's per-expert linears (neuqi_export/experts.py names them
`<block>.<experts>.<e>.<part>`) stacked into llama.cpp's 3-D expert tensors `blk.N.ffn_{gate,up,down}_exps`
(experts, rows, row bytes: each expert's rows packed as a 2-D tensor of the same type, one after the other), and the
router `ffn_gate_inp` kept F32 as llama.cpp's converter keeps it.
"""
from __future__ import annotations

import re
from typing import Callable

import numpy as np

from .exact import PackedTensor

F32_ROLES = ("ffn_gate_inp",)  # float tensors llama.cpp's converter stores F32 whatever the file type


def expert_key(family, lname: str) -> tuple[str, int] | None:
    """(the stacked HF name `<block>.<experts>.<part>`, the expert's index) of a per-expert linear; None otherwise."""
    if family.experts is None:
        return None
    m = re.match(rf"^(.*\.{re.escape(family.experts)})\.(\d+)\.(\w+)$", lname)
    return (f"{m[1]}.{m[3]}", int(m[2])) if m else None


def stack(name: str, parts: dict[int, PackedTensor], n_experts: int,
          repack: Callable[[int, str], PackedTensor]) -> PackedTensor:
    """One tensor (experts, rows, row bytes) from each expert's packed rows. All experts must share one type: an
    expert packed in another (a legacy fallback taken for one expert only) is repacked in the first expert's type
    with repack(expert, qtype)."""
    missing = sorted(set(range(n_experts)) - set(parts))
    if missing:
        raise ValueError(f"{name}: experts {missing[:4]} missing from the master")
    qtype = parts[0].qtype
    for e in range(n_experts):
        if parts[e].qtype != qtype:
            parts[e] = repack(e, qtype)
    data = np.stack([np.ascontiguousarray(parts[e].data) for e in range(n_experts)])
    err = sum(p.added_error for p in parts.values())
    n_exact = sum(p.exact for p in parts.values())
    notes = sorted({p.note for p in parts.values() if p.note})
    note = f"{n_experts} experts stacked ({n_exact} exact)" + (f"; {notes[0]}" if notes else "")
    return PackedTensor(data, qtype, n_exact == n_experts, err, max(p.rel_error for p in parts.values()), note)


def is_f32_role(gguf_name: str) -> bool:
    """Whether llama.cpp's converter keeps this tensor F32 (the MoE router)."""
    return any(f".{role}." in gguf_name for role in F32_ROLES)


def expert_roles(config: dict) -> dict[str, tuple[str, int]]:
    """{expert part (gate_proj / up_proj / down_proj): (its stacked GGUF role, e.g. 'ffn_down_exps', row length =
    input dim)} of an MoE family's blocks, from gguf-py's tensor names; {} for a dense family."""
    from neuqi_export.errors import UserError

    from .arch import check, tensor_map

    fam = check(config)
    if fam.experts is None:
        return {}
    from neuqi_export.experts import PARTS

    tmap = tensor_map(fam, 1)
    inter = int(config.get("moe_intermediate_size") or config["intermediate_size"])
    out = {}
    for part in PARTS:
        g = tmap.get_name(f"{fam.blocks_path}.0.{fam.experts}.{part}.weight", try_suffixes=(".weight",))
        if g is None:
            raise UserError(f"{fam.model_type}: experts' {part} has no GGUF name in llama.cpp's {fam.gguf_arch}; "
                            "export another format")
        out[part] = (g.split(".")[2], inter if part == "down_proj" else int(config["hidden_size"]))
    return out
