"""The compute device a command runs on."""
from __future__ import annotations

import torch

from .errors import UserError


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or None/'auto' (CUDA when present); UserError for an unusable choice."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for, but no CUDA GPU is available; use --device cpu")
    if not (str(device) == "cpu" or str(device).startswith("cuda")):
        raise UserError(f"--device {device!r} is unknown; use cpu, cuda or auto")
    return torch.device(device)
