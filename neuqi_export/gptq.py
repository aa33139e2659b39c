"""GPTQ with fixed per-group parameters, act-order and static groups (NEUQI.md).

The parameters (scale, zero) of every group are computed once from the original weights before
the column loop; each column uses the parameters of the group it belongs to in the ORIGINAL column
order, even after act-order permutes the columns. Pure tensor function, CPU or CUDA.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class UniformColumns:
    """Column j of a uniform grid: q = clamp(round(w/s + z), 0, 2^bits − 1) with its group's fixed (s, z)."""

    scale: torch.Tensor  # float32 (out, n_groups)
    zero: torch.Tensor  # float32 (out, n_groups)
    bits: int
    group_size: int  # the effective one (in for per-channel)

    def round_col(self, j: int, w: torch.Tensor):
        s, z = self.scale[:, j // self.group_size], self.zero[:, j // self.group_size]
        q = torch.clamp(torch.round(w / s + z), 0, (1 << self.bits) - 1)
        return q, s * (q - z)

    def to(self, device) -> "UniformColumns":
        return UniformColumns(self.scale.to(device, torch.float32).contiguous(),
                              self.zero.to(device, torch.float32).contiguous(), self.bits, self.group_size)


@dataclass(frozen=True)
class TableColumns:
    """Column j rounded to the nearest of the K values its sub-block offers (a fixed lattice: GGUF block types).
    affine: the values are v0 + step·k in the code (every type but a non-uniform code book)."""

    values: torch.Tensor  # float32 (out, n / sub_block, K)
    sub_block: int
    affine: bool

    def round_col(self, j: int, w: torch.Tensor):
        vals = self.values[:, j // self.sub_block]
        q = (nearest_affine if self.affine else nearest)(w, vals)
        return q, vals.gather(1, q[:, None])[:, 0]

    def to(self, device) -> "TableColumns":
        return TableColumns(self.values.to(device, torch.float32).contiguous(), self.sub_block, self.affine)


def nearest(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of `values` (..., K) for each w (...), ties to the lower index."""
    return (w.unsqueeze(-1) - values).abs().argmin(-1)


def nearest_affine(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`nearest` for value sets affine in the code (v0 + step·k): the index from (w - v0)/step, then the best of
    it and its two neighbours against the actual values (float32 spacing is uniform only to an ulp), ties to the
    lower index; O(3) per weight instead of O(K)."""
    K = values.shape[-1]
    v0 = values[..., 0]
    step = values[..., 1] - v0
    q0 = torch.where(step != 0, torch.round((w - v0) / torch.where(step != 0, step, 1.0)), torch.zeros_like(w))
    cand = (q0.clamp(0, K - 1).long().unsqueeze(-1) + torch.arange(-1, 2, device=w.device)).clamp(0, K - 1)
    pick = (w.unsqueeze(-1) - values.gather(-1, cand)).abs().argmin(-1, keepdim=True)
    return cand.gather(-1, pick).squeeze(-1)


def _block_cpu(grid, W1: torch.Tensor, U1: torch.Tensor, cols: torch.Tensor):
    """The numba kernel for one block (gptq_cpu.py): (codes, errors) as the torch loop computes them."""
    from . import gptq_cpu

    WT, Ub, idx = np.ascontiguousarray(W1.numpy().T), np.ascontiguousarray(U1.numpy()), cols.numpy()
    if isinstance(grid, UniformColumns):
        codes, E = gptq_cpu.block_uniform(WT, Ub, (idx // grid.group_size).astype(np.int64), grid.scale.numpy(),
                                          grid.zero.numpy(), 1 << grid.bits)
    else:
        codes, E = gptq_cpu.block_table(WT, Ub, (idx // grid.sub_block).astype(np.int64), grid.values.numpy(),
                                        grid.affine)
    return torch.from_numpy(codes).T, torch.from_numpy(E).T


def _block_torch(grid, W1: torch.Tensor, U1: torch.Tensor, cols: list):
    """The reference loop for one block (any device): one column at a time, errors spread to the block's rest."""
    codes = torch.empty(W1.shape, dtype=torch.uint8, device=W1.device)
    E1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w = W1[:, i]
        q, w_hat = grid.round_col(cols[i], w)
        codes[:, i] = q.to(torch.uint8)
        err = (w - w_hat) / U1[i, i]
        W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        E1[:, i] = err
    return codes, E1


def use_cpu_kernel(device, impl: str = "auto") -> bool:
    """Whether GPTQ's block loop runs in the numba kernel: impl 'auto' on a CPU with numba, 'numba' forced
    (error without numba), 'torch' never."""
    from .gptq_cpu import HAVE_NUMBA

    if impl == "torch":
        return False
    if impl == "numba":
        if not HAVE_NUMBA:
            raise RuntimeError("GPTQ impl 'numba' asked for, but numba is not importable")
        return True
    if impl != "auto":
        raise ValueError(f"unknown GPTQ impl {impl!r}; use auto, numba or torch")
    return HAVE_NUMBA and torch.device(device).type == "cpu"


@dataclass(frozen=True)
class GPTQFactor:
    """What GPTQ derives from H alone, shared by every linear that reads the same input (one subset)."""

    perm: torch.Tensor  # column order (act-order: diag(H) descending, stable)
    dead: torch.Tensor  # bool (in,): inputs that never fire (their weights are zeroed)
    U: torch.Tensor  # float32 upper Cholesky factor of the permuted H⁻¹

    @classmethod
    def of(cls, H: torch.Tensor, act_order: bool = True, device=None) -> "GPTQFactor":
        H = H.to(device if device is not None else H.device, torch.float64).clone()
        n = H.shape[0]
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1.0
        perm = (torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order
                else torch.arange(n, device=H.device))
        H = H[perm][:, perm]
        return cls(perm, dead, _inverse_cholesky_upper(H).to(torch.float32))


def gptq_with_rounding(weight: torch.Tensor, H: torch.Tensor | None, grid, act_order: bool = True,
                       blocksize: int = 128, impl: str = "auto", factor: GPTQFactor | None = None) -> torch.Tensor:
    """Codes (uint8, (out, in)) minimising tr(ΔW H ΔWᵀ) greedily, column by column (GPTQ), each column rounded
    onto the fixed grid of its ORIGINAL index (`UniformColumns` / `TableColumns`). impl: `use_cpu_kernel`.
    factor: GPTQFactor.of(H, act_order), when the caller shares one between the linears of a subset."""
    W = weight.detach().to(torch.float32).clone()
    out, n = W.shape
    grid = grid.to(W.device)
    if factor is None:
        factor = GPTQFactor.of(H, act_order, W.device)
    perm, U = factor.perm.to(W.device), factor.U.to(W.device)
    W[:, factor.dead.to(W.device)] = 0.0
    W = W[:, perm]
    fast = use_cpu_kernel(W.device, impl)
    cols = perm.cpu() if fast else perm.tolist()
    codes = torch.empty(out, n, dtype=torch.uint8, device=W.device)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        q, E1 = (_block_cpu if fast else _block_torch)(grid, W1, U1, cols[i1:i2])
        codes[:, i1:i2] = q
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    return codes[:, inv].contiguous()


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int, group_size: int, act_order: bool = True, blocksize: int = 128,
                  impl: str = "auto", factor: GPTQFactor | None = None) -> torch.Tensor:
    """Codes (uint8, (out, in)) for `weight` that minimise GPTQ's layer-wise error tr(ΔW H ΔWᵀ)
    greedily, with the fixed per-group (scale, zero) (each (out, n_groups)); H is damped, (in, in)."""
    gs = weight.shape[1] if group_size == -1 else group_size
    grid = UniformColumns(scale, zero, bits, gs)  # static groups: column j keeps its original group's parameters
    return gptq_with_rounding(weight, H, grid, act_order=act_order, blocksize=blocksize, impl=impl, factor=factor)


def weighted_error(weight: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ), the layer-output error GPTQ minimises, in float64."""
    D = (weight.to(torch.float64) - deq.to(torch.float64)).to(H.device)
    return float(((D @ H.to(torch.float64)) * D).sum())
