#!/usr/bin/env python3
"""CUDA vs CPU parity of the NeUQI search (run on a GPU machine; CI has none, so this is not a test).

    python tools/check_cuda.py
Exits non-zero on a mismatch: the same per-group loss (rtol 1e-5) from CUDA and CPU for every method.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuqi_export.quant.params import group_loss, init_params  # noqa: E402
from neuqi_export.quant.zeropoint import optimal_zero_point  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    g = torch.Generator().manual_seed(2)
    X = torch.distributions.StudentT(2.0).sample((512, 128)) * 3
    H = torch.rand(512, 128, generator=g) ** 4
    for bits in (2, 3, 4, 8):
        _, ec = optimal_zero_point(X, H, bits)
        _, eg = optimal_zero_point(X.cuda(), H.cuda(), bits)
        torch.testing.assert_close(eg.cpu(), ec, rtol=1e-5, atol=1e-9)
    W = torch.distributions.StudentT(3.0).sample((64, 576)) * 0.02
    h = torch.rand(576, generator=g) ** 2 + 1e-3
    for method in ("minmax", "neuqi_int", "neuqi"):
        for bits in (2, 4):
            sc, zc = init_params(W, bits, 128, method, hdiag=h, impl="reference") if method == "neuqi" else \
                init_params(W, bits, 128, method, hdiag=h)
            sg, zg = init_params(W.cuda(), bits, 128, method, hdiag=h.cuda())
            lc = group_loss(W, sc, zc, bits, 128, h)
            lg = group_loss(W, sg.cpu(), zg.cpu(), bits, 128, h)
            torch.testing.assert_close(lg, lc, rtol=1e-5, atol=0)
            print(f"{method} {bits}-bit: CUDA == CPU (Σ loss {float(lg.sum()):.6g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
