"""Accumulate H = XᵀX / N of a linear layer's inputs in float64, and damp it (NEUQI.md)."""
from __future__ import annotations

import torch


class HessianAccumulator:
    """Running float64 sum of x xᵀ over every token a forward hook sees."""

    def __init__(self, in_features: int, device=None):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float64)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def hook(self, module, inputs, output=None) -> None:
        """forward_pre_hook / forward_hook signature: accumulate the module's first input."""
        self.add(inputs[0])

    def damped(self, percdamp: float = 0.01) -> torch.Tensor:
        """H / N + percdamp * mean(diag) * I, float64."""
        if self.count == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return damp(self.sum / self.count, percdamp)


def damp(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """H + percdamp * mean(diag H) * I (a copy); an all-zero H becomes the identity."""
    H = H.clone()
    mean_diag = torch.diagonal(H).mean()
    if not torch.isfinite(mean_diag):
        raise RuntimeError("calibration activations are not finite (NaN/Inf in H)")
    if mean_diag <= 0:
        return torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    H.diagonal().add_(percdamp * mean_diag)
    return H
