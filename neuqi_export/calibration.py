"""The calibration passes' plumbing: the hidden states entering block 0, each block's own arguments, and a
block's outputs for every window (what the next block is calibrated on)."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .replay import BlockReplay


class StopForward(Exception):
    """Raised by a hook to end a forward pass early (nothing after that point is needed)."""


def submodule(block, dotted: str):
    """block.a.b.c for dotted = 'a.b.c'."""
    obj = block
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_device(obj, device, memo: dict | None = None):
    """obj (tensors inside tuples, lists, dicts) on `device`; `memo` keeps one copy of a tensor shared by
    several blocks' arguments."""
    memo = {} if memo is None else memo
    if torch.is_tensor(obj):
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept so that its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model, blocks, windows: torch.Tensor, device, progress: bool = False,
                         store=None) -> tuple[list, list]:
    """Hidden states entering block 0 for each window (kept on CPU, appended to `store`: a list by default, or an
    activations.Activations that spills to disk), and each block's keyword arguments (its mask and rotary tables:
    they differ between sliding-window and full layers), on CPU."""
    captured, per_block = ([] if store is None else store), [None] * len(blocks)

    def grab(module, args, kwargs):
        captured.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        raise StopForward

    def recorder(k):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise RuntimeError(f"block {k} got positional arguments besides hidden_states; update capture_block_inputs")
            per_block[k] = {n: v for n, v in kwargs.items() if n not in ("hidden_states", "past_key_values", "cache")}
            if k == len(blocks) - 1:
                raise StopForward
            return hidden_states
        return forward

    inner = model.model
    movable = [inner.embed_tokens, getattr(inner, "rotary_emb", None)]
    for m in movable:
        if m is not None:
            m.to(device)
    try:
        # one pass with every block's forward replaced by a recorder of its arguments (blocks run nothing)
        for k, block in enumerate(blocks):
            block.forward = recorder(k)
        try:
            inner(input_ids=windows[:1].to(device), use_cache=False)
        except StopForward:
            pass
        finally:
            for block in blocks:
                del block.forward
        handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            for i in tqdm(range(windows.shape[0]), desc="calibration", unit="window", disable=not progress,
                          leave=False):
                try:
                    inner(input_ids=windows[i : i + 1].to(device), use_cache=False)
                except StopForward:
                    pass
        finally:
            handle.remove()
    finally:
        inner.embed_tokens.to("cpu")
    memo: dict = {}
    return captured, [dict(to_device(kw, "cpu", memo), use_cache=False) for kw in per_block]


@torch.no_grad()
def block_outputs(block, inputs: list, kwargs: dict, device, replay: BlockReplay | None = None,
                   done: int = 0, out=None) -> list:
    """The block's output for every window (CPU), appended to `out` (a new list by default); `replay`: after
    `done` subsets were quantized in it."""
    out = [] if out is None else out
    if replay is None:
        for x in inputs:
            out.append(block(x.to(device), **kwargs).detach().cpu())
        return out
    replay.begin_pass(done, last=True)
    try:
        for w, x in enumerate(inputs):
            replay.window = w
            out.append(block(x.to(device), **kwargs).detach().cpu())
        return out
    finally:
        replay.close()
