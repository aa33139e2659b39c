"""Perplexity over token windows (see DESIGN.md, "Evaluation protocol").

Each window is scored on its own (no state carried between windows): the logits at positions
0..seqlen-2 predict the tokens at 1..seqlen-1, so a window contributes seqlen-1 scored tokens and
its first token is context only. The NLL is computed from a float64 log-softmax of the logits,
whatever dtype the runtime returns, so runtimes differ only by their logits.
ppl = exp(mean NLL over all scored tokens). Non-finite logits give a nan/inf perplexity (they are
reported, not hidden).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_ROWS = 256  # positions per float64 log-softmax block (bounds memory at large vocab x seqlen)


@dataclass
class PplResult:
    ppl: float
    nll_mean: float
    windows: int
    seqlen: int
    tokens: int

    def __str__(self) -> str:
        return f"ppl {self.ppl:.2f} ({self.windows} windows × {self.seqlen} tokens = {self.tokens:,} scored tokens)"


def _check_windows(windows) -> torch.Tensor:
    w = torch.as_tensor(windows)
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 2:
        raise ValueError(f"windows must be a (n >= 1, seqlen >= 2) tensor of token ids, got shape {tuple(w.shape)}")
    if w.is_floating_point() or w.is_complex():
        raise ValueError(f"windows must hold integer token ids, got {w.dtype}")
    return w.to(torch.long)


def window_nll(logits, ids) -> torch.Tensor:
    """float64 (b,) summed next-token NLL of each window: logits (b, L, V) score ids (b, L) at 1..L-1."""
    logits = torch.from_numpy(np.asarray(logits)) if not isinstance(logits, torch.Tensor) else logits
    ids = ids.to(logits.device)
    b, L = ids.shape
    if logits.ndim != 3 or tuple(logits.shape[:2]) != (b, L):
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)}, expected ({b}, {L}, vocab)")
    total = torch.zeros(b, dtype=torch.float64, device=logits.device)
    for s in range(0, L - 1, _ROWS):
        e = min(s + _ROWS, L - 1)
        lp = torch.log_softmax(logits[:, s:e].to(torch.float64), dim=-1)
        total -= lp.gather(-1, ids[:, s + 1:e + 1, None]).squeeze(-1).sum(-1)
    return total


def _result(nll_sum: float, n_windows: int, seqlen: int) -> PplResult:
    tokens = n_windows * (seqlen - 1)
    nll = nll_sum / tokens
    return PplResult(ppl=math.exp(nll) if nll < 700 else math.inf, nll_mean=nll, windows=n_windows,
                     seqlen=seqlen, tokens=tokens)


def perplexity_from_logits_fn(logits_fn, windows, progress: bool = True, batch_size: int = 1) -> PplResult:
    """Perplexity of the model behind `logits_fn` on `windows` (LongTensor (n, seqlen)).

    `logits_fn(ids)` takes a CPU LongTensor (b, seqlen) and returns float logits (b, seqlen, vocab),
    as a numpy array or a torch tensor; it is called with `batch_size` windows at a time.
    """
    from tqdm.auto import tqdm

    w = _check_windows(windows)
    n, L = w.shape
    nll_sum = 0.0
    bar = tqdm(total=n, desc="perplexity", unit="window", disable=not progress)
    try:
        for i in range(0, n, batch_size):
            ids = w[i:i + batch_size]
            nll_sum += float(window_nll(logits_fn(ids), ids).sum())
            bar.update(ids.shape[0])
            bar.set_postfix(ppl=f"{math.exp(min(nll_sum / ((i + ids.shape[0]) * (L - 1)), 700)):.2f}")
    finally:
        bar.close()
    return _result(nll_sum, n, L)


def _model_device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def perplexity_hf(model, windows, batch_size: int = 1, device=None, progress: bool = True) -> PplResult:
    """Perplexity of a transformers causal LM on `windows` (LongTensor (n, seqlen)).

    The model is put in eval mode and run without gradients on `device` (default: where its
    parameters are; the model is not moved); logits are scored on that device in float64.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    model.eval()

    def logits_fn(ids):
        out = model(input_ids=ids.to(device), use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    with torch.inference_mode():
        return perplexity_from_logits_fn(logits_fn, windows, progress=progress, batch_size=batch_size)
