"""Shared by the Triton kernel tests (CI has no GPU): run a test module's `_run_child` in a child process under
Triton's CPU interpreter, and compile a kernel for sm_90 with Triton's bundled ptxas (no GPU needed)."""
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def case_weights(rows: int, cols: int, seed: int, zero_h_tail: bool = False):
    """Heavy-tailed Student-t(3) weights and a random positive diag(H); with 200 columns also an all-zero group,
    a constant group and zeros in h (and, with zero_h_tail, a last group of 8 whose h is all zero)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    W = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    h = torch.rand(cols, generator=g) ** 3 * 4 + 0.01
    if cols == 200:
        W[0, :64] = 0.0
        W[1, 64:128] = 0.37
        h[::5] = 0.0
        if zero_h_tail:
            h[192:] = 0.0
    return W, h


def start_child(test_file: str, out_path: Path):
    """Starts `python test_file out_path` with TRITON_INTERPRET=1 (read when the kernels are decorated, so it must
    be set before the first import): the module's `__main__` writes its kernel results to out_path."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, test_file, str(out_path)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def child_fixture(test_file: str, tmp_path_factory, name: str):
    """Generator body of a module fixture: yields (process, out_path) and kills the child if it is still running."""
    out = tmp_path_factory.mktemp(name) / "res.pt"
    p = start_child(test_file, out)
    yield p, out
    if p.poll() is None:
        p.kill()
        p.communicate()


def child_fixtures(test_file: str, name: str, results_name: str):
    """The two module fixtures of a kernel test: an autouse one that starts the interpreter child at the module's
    first test (so the other tests overlap with it), and `results_name`, the child's results. Assign both to
    module names: `_child, results = child_fixtures(__file__, "triton", "triton_results")`."""
    import pytest

    @pytest.fixture(scope="module", autouse=True, name=f"_{name}_child")
    def _child(tmp_path_factory):
        yield from child_fixture(test_file, tmp_path_factory, name)

    @pytest.fixture(scope="module", name=results_name)
    def _results(request):
        return child_results(request.getfixturevalue(f"_{name}_child"))

    return _child, _results


def child_results(child):
    """Waits for the child of `child_fixture` and loads what it wrote (its stderr on failure)."""
    import torch
    p, out = child
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stdout[-3000:] + stderr[-6000:]
    return torch.load(out)


def compile_sm90(kernel, pointers, ints, constexprs: dict, num_warps: int) -> tuple[int, bool, int, int]:
    """(cubin bytes, whether the PTX has an fp32 FMA, registers, local-memory bytes) of `kernel` compiled for sm_90
    without FMA contraction: pointer args float32, int args i32, the rest the given constexprs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: "*fp32" for name in pointers}
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "enable_fp_fusion": False})
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1)) + int(re.search(r"STACK:(\d+)", usage).group(1))
    return len(k.asm["cubin"]), "fma.rn.f32" in k.asm["ptx"], regs, local


def compiled(module: str, func: str, args: tuple, interpreting: bool) -> tuple[int, bool, int, int]:
    """`module.func(*args)` (a compile_sm90 wrapper) in this process, or, where this session interprets kernels
    (TRITON_INTERPRET set: nothing compiles), in a child process without it."""
    if not interpreting:
        import importlib
        return getattr(importlib.import_module(module), func)(*args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    code = f"from {module} import {func}; print(*{func}{tuple(args)!r})"
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    size, fma, regs, local = res.stdout.split()[-4:]
    return int(size), fma == "True", int(regs), int(local)
