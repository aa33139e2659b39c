#!/usr/bin/env python3
"""CUDA vs CPU parity of the NeUQI search (run on a GPU machine; CI has none, so this is not a test).

    python tools/check_cuda.py                 # on a machine with CUDA
    python tools/check_cuda.py --cpu-dry-run   # no GPU: the Triton kernel in Triton's CPU interpreter (slow)

Exits non-zero on a mismatch. minmax / Stage A: the same per-group loss (rtol 1e-5) from CUDA and CPU.
neuqi / mse / neuqi_int: the Triton kernels (impl="triton") and the torch path on CUDA (impl="reference")
against the CPU torch path and the CPU numba kernels: every group's loss within rtol 1e-5 of the CPU torch path's and the
summed loss at most 1e-6 above it (float32 rounding only; ratios are printed).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from neuqi_export.quant.params import group_loss, init_params  # noqa: E402
from neuqi_export.quant.zeropoint import optimal_zero_point  # noqa: E402

RTOL = 1e-5


def _report(tag: str, lg: torch.Tensor, lc: torch.Tensor) -> bool:
    """Prints the per-group and summed loss ratios of lg to lc; True if within RTOL and the sum is not worse."""
    rel = float(((lg - lc).abs() / lc.clamp_min(1e-30)).max())
    ratio = float(lg.sum() / lc.sum())
    ok = bool(torch.all((lg - lc).abs() <= RTOL * lc + 1e-30)) and ratio <= 1 + 1e-6
    print(f"  {tag:<28} max |loss/cpu - 1| {rel:.2e}  sum ratio {ratio:.9f}  {'ok' if ok else 'MISMATCH'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="no GPU: run the Triton kernel on CPU tensors in Triton's interpreter (checks this script)")
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read when params first imports fast_triton (lazily)
        dev, rows = "cpu", 8
    elif not torch.cuda.is_available():
        print("no CUDA device (use --cpu-dry-run to exercise the script on the CPU)")
        return 2
    else:
        dev, rows = "cuda", 64
    g = torch.Generator().manual_seed(2)
    ok = True
    try:
        import triton
        from neuqi_export.quant import fast_triton
        print(f"triton {triton.__version__}; surrogate merge network: {'yes' if fast_triton.HAVE_MERGE else 'no (full sort)'}"
              f"; device: {torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu (interpreter)'}")
    except ImportError as e:
        print(f"triton not importable ({e}): the Triton rows below will fail")
    if dev == "cuda":
        X = torch.distributions.StudentT(2.0).sample((512, 128)) * 3
        H = torch.rand(512, 128, generator=g) ** 4
        for bits in (2, 3, 4, 8):
            _, ec = optimal_zero_point(X, H, bits)
            _, eg = optimal_zero_point(X.cuda(), H.cuda(), bits)
            torch.testing.assert_close(eg.cpu(), ec, rtol=1e-5, atol=1e-9)
        print("Stage A: CUDA == CPU")
    W = torch.distributions.StudentT(3.0).sample((rows, 576)) * 0.02  # 576 = 4.5 groups of 128: a ragged tail
    h = torch.rand(576, generator=g) ** 2 + 1e-3
    if dev == "cuda":
        for method in ("minmax",):
            for bits in (2, 4):
                lc = group_loss(W, *init_params(W, bits, 128, method, hdiag=h), bits, 128, h)
                sg, zg = init_params(W.cuda(), bits, 128, method, hdiag=h.cuda())
                lg = group_loss(W, sg.cpu(), zg.cpu(), bits, 128, h)
                torch.testing.assert_close(lg, lc, rtol=1e-5, atol=0)
                print(f"{method} {bits}-bit: CUDA == CPU (Σ loss {float(lg.sum()):.6g})")
    Wd, hd = W.to(dev), h.to(dev)
    for method in ("neuqi", "mse", "neuqi_int"):
        hl = None if method == "mse" else h
        for gs in (128, 64, 32):
            for bits in ((2, 3, 4, 8) if gs == 128 else (2, 4)):
                print(f"{method} {bits}-bit g{gs}:")
                lc = group_loss(W, *init_params(W, bits, gs, method, hdiag=h, impl="reference"), bits, gs, hl)
                ok &= _report("CPU numba (auto)", group_loss(W, *init_params(W, bits, gs, method, hdiag=h), bits,
                                                             gs, hl), lc)
                impls = ("reference", "triton") if dev == "cuda" else ("triton",)
                for impl in impls:
                    s, z = init_params(Wd, bits, gs, method, hdiag=hd, impl=impl)
                    ok &= _report(f"{dev} {impl}", group_loss(W, s.cpu(), z.cpu(), bits, gs, hl), lc)
                if dev == "cuda":  # auto on CUDA is the Triton kernel when triton is installed
                    a = init_params(Wd, bits, gs, method, hdiag=hd)
                    t = init_params(Wd, bits, gs, method, hdiag=hd, impl="triton")
                    ok &= bool(torch.equal(a[0], t[0]) and torch.equal(a[1], t[1]))
    print("all checks passed" if ok else "MISMATCH (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
