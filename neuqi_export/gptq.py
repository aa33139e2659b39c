"""GPTQ with fixed per-group parameters, act-order and static groups (NEUQI.md).

The parameters (scale, zero) of every group are computed once from the original weights before
the column loop; each column uses the parameters of the group it belongs to in the ORIGINAL column
order, even after act-order permutes the columns. Pure tensor function, CPU or CUDA.
"""
from __future__ import annotations

import torch


def _inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (float64 in, float64 out), raising damping if H is not PD."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    extra = 0.0
    mean_diag = torch.diagonal(H).mean()
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + extra * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        extra = 0.01 if extra == 0 else extra * 10
    raise RuntimeError("Hessian is not positive definite even after extra damping")


def gptq_with_rounding(weight: torch.Tensor, H: torch.Tensor, round_col, act_order: bool = True,
                       blocksize: int = 128) -> torch.Tensor:
    """Codes (uint8, (out, in)) minimising tr(ΔW H ΔWᵀ) greedily, column by column (GPTQ), where
    round_col(j, w) -> (codes (out,), ŵ (out,)) rounds column w whose ORIGINAL index is j onto its fixed grid."""
    W = weight.detach().to(torch.float32).clone()
    out, n = W.shape
    H = H.to(W.device, torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n, device=W.device)
    W = W[:, perm]
    H = H[perm][:, perm]
    cols = perm.tolist()
    U = _inverse_cholesky_upper(H).to(torch.float32)
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q, w_hat = round_col(cols[i1 + i], w)
            codes[:, i1 + i] = q.to(torch.uint8)
            err = (w - w_hat) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv].contiguous()


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int, group_size: int, act_order: bool = True, blocksize: int = 128) -> torch.Tensor:
    """Codes (uint8, (out, in)) for `weight` that minimise GPTQ's layer-wise error tr(ΔW H ΔWᵀ)
    greedily, with the fixed per-group (scale, zero) (each (out, n_groups)); H is damped, (in, in)."""
    gs = weight.shape[1] if group_size == -1 else group_size
    scale = scale.to(weight.device, torch.float32)
    zero = zero.to(weight.device, torch.float32)
    L = (1 << bits) - 1

    def round_col(j: int, w: torch.Tensor):  # static groups: column j keeps its original group's parameters
        s, z = scale[:, j // gs], zero[:, j // gs]
        q = torch.clamp(torch.round(w / s + z), 0, L)
        return q, s * (q - z)

    return gptq_with_rounding(weight, H, round_col, act_order=act_order, blocksize=blocksize)


def weighted_error(weight: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), the layer-output error GPTQ minimises, in float64."""
    D = (weight.to(torch.float64) - deq.to(torch.float64)).to(H.device)
    return float(((D @ H.to(torch.float64)) * D).sum())
