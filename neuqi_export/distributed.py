"""Quantize across processes with torch.distributed (docs/DISTRIBUTED.md): data-parallel calibration, weight-parallel
NeUQI + GPTQ, the same master bytes whatever the number of processes.

The design is llm-compressor's (ARCH_FACTS.md C), with one change that makes the answer independent of the world
size: the Hessians are not reduced as per-rank partial sums (float64 sums of partial sums round differently from the
one running sum the single process keeps), but every rank's calibration inputs are broadcast, window by window in
window order, to the ranks that own a linear of the subset, which then run exactly the single process's running
`HessianAccumulator.add` over the same tensors in the same order. An input x (tokens x n_in) is also smaller than
its H (n_in x n_in) once a window has more tokens than the linear has inputs, so this costs no more traffic.

- World: rank and size from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK; MASTER_ADDR/PORT), backend
  nccl on CUDA and gloo on CPU. No WORLD_SIZE (or 1): the single-process path, untouched.
- Windows: rank r calibrates windows r, r+N, r+2N, ... (each block's outputs too: only its own windows).
- Owners: per linear subset, greedy bin-packing by cost out x in (largest first, onto the least loaded rank of the
  subset, ties to the least loaded of the block so far, then the lower rank); an owner runs NeUQI + GPTQ, then
  broadcasts the record, the losses and the dequantized weight, which every rank sets.
- Faults: every collective runs under the process group's timeout; a failure or timeout is one UserError naming
  this rank, the collective and the rank it waited on.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

from . import dist_faults as _faults
from .errors import UserError
from .hessian import HessianAccumulator

COMM = "communication"  # the timer stage of the collectives
DEFAULT_TIMEOUT_S = 600.0  # a collective that waits longer than this ends the run (--dist-timeout)


@dataclass(frozen=True)
class World:
    """This process's place among the quantizing processes (size 1: alone)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def comm_device(self):
        """Where tensors must sit for this backend's collectives."""
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


SINGLE = World()


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment variables; (0, 1, 0) without them. A malformed
    value is one UserError."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE / RANK / LOCAL_RANK are not integers; launch with torchrun (or --nproc), or "
                        "unset them") from None
    if size < 1 or not 0 <= rank < size:
        raise UserError(f"RANK={rank} is not in [0, WORLD_SIZE={size}); launch with torchrun (or --nproc)")
    return rank, size, local


def init(device: str = "cpu", timeout_s: float | None = None) -> tuple[World, str]:
    """Join the process group the environment describes (once; later calls return the same world) and return it
    with the device this rank computes on (cuda:LOCAL_RANK for nccl). Without WORLD_SIZE > 1: (SINGLE, device)."""
    import torch.distributed as dist

    rank, size, local = env_world()
    if size == 1:
        return SINGLE, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPUs; start at "
                            "most one process per GPU (--nproc / --nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, rank=rank, world_size=size)
        except (RuntimeError, ValueError) as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise UserError(f"rank {rank} of {size}: could not join the other processes ({msg}); check "
                            "MASTER_ADDR/MASTER_PORT and that every rank was started") from None
        _faults.register(rank)
    return World(rank, size, local, dist.get_backend()), device


def current() -> World:
    """The world of an initialised process group (see init), else SINGLE."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    rank, size, local = env_world()
    return World(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


@contextmanager
def guarded(world: World, what: str):
    """Run collectives; a failure (a rank died, or one hung past the timeout) becomes one UserError naming this rank
    and `what` (which says the rank waited on)."""
    _faults.at(world.rank, what)
    try:
        yield
    except RuntimeError as exc:  # DistBackendError / gloo's connection and timeout errors are RuntimeErrors
        msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"rank {world.rank} of {world.size}: {_faults.diagnose(world.rank, world.size, what)}; "
                        f"stopped while {what} ({msg}). Finished blocks stay in <out>.partial: rerun the same "
                        "command (any --nproc) to resume") from None


def from_rank0(world: World, fn, what: str):
    """fn() evaluated on rank 0 and broadcast (pickled) to every rank; alone: fn()."""
    if not world.active:
        return fn()
    import torch.distributed as dist

    box = [fn() if world.rank == 0 else None]
    with guarded(world, what if world.rank == 0 else f"{what} (from rank 0)"):
        dist.broadcast_object_list(box, src=0, device=world.comm_device)
    return box[0]


def barrier(world: World, what: str) -> None:
    """Every rank waits here for the others (alone: nothing)."""
    if world.active:
        import torch.distributed as dist

        with guarded(world, what):
            dist.barrier()


def my_windows(world: World, n: int) -> list[int]:
    """The calibration windows this rank takes: rank, rank + size, ... below n."""
    return list(range(world.rank, n, world.size))


class OwnerPlan:
    """Owner ranks for a block's linears, subset by subset (see the module doc); alone: rank 0 owns all."""

    def __init__(self, world: World):
        self.world = world
        self.block_load = [0] * world.size

    def assign(self, costs: dict[str, int]) -> dict[str, int]:
        """{name: owner rank} for one subset's {name: out * in}."""
        load = [0] * self.world.size
        owners = {}
        for name in sorted(costs, key=lambda n: -costs[n]):  # stable: equal costs keep the subset's order
            r = min(range(self.world.size), key=lambda i: (load[i], self.block_load[i], i))
            owners[name] = r
            load[r] += costs[name]
            self.block_load[r] += costs[name]
        return {n: owners[n] for n in costs}


class OrderedHessian:
    """A HessianAccumulator stand-in for one subset's distributed calibration pass: `add` keeps this rank's window
    inputs; `damped` broadcasts every window's input in window order and, on a rank that `needs` H, adds them into
    a HessianAccumulator exactly as the single process does (same tensors, same order, same dtype), so H is
    bit-identical whatever the world size. Ranks that do not need H return None."""

    def __init__(self, world: World, in_features: int, n_windows: int, need: bool, device, timer):
        self.world, self.n, self.need, self.timer = world, n_windows, need, timer
        self.acc = HessianAccumulator(in_features, device=device) if need else None
        self.local: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.local.append(x.detach())

    def damped(self, percdamp: float = 0.01):
        import torch.distributed as dist

        mine = my_windows(self.world, self.n)
        if len(self.local) != len(mine) or not self.local:
            raise RuntimeError(f"rank {self.world.rank} saw {len(self.local)} calibration windows, expected {len(mine)}")
        template, dev = self.local[0], self.world.comm_device
        for w in range(self.n):
            src = w % self.world.size
            x = self.local[w // self.world.size] if src == self.world.rank else \
                torch.empty(template.shape, dtype=template.dtype, device=dev)
            x = x.to(dev).contiguous()
            what = f"broadcasting calibration window {w}" if src == self.world.rank else \
                f"receiving calibration window {w} from rank {src}"
            with self.timer.stage(COMM), guarded(self.world, what):
                dist.broadcast(x, src=src)
            if self.need:
                with self.timer.stage("hessian"):
                    self.acc.add(x)
        self.local = []
        return self.acc.damped(percdamp) if self.need else None


def share_results(world: World, owners: dict[str, int], results: dict[str, tuple], timer) -> dict[str, tuple]:
    """Every linear's (record, losses, dequantized weight) on every rank, each broadcast by its owner in `owners`'
    order (`results` holds this rank's own); the weight comes back on the device it left. Alone: `results`."""
    if not world.active:
        return results
    with timer.stage(COMM):
        return _share(world, owners, results)


def _share(world: World, owners: dict[str, int], results: dict[str, tuple]) -> dict[str, tuple]:
    import torch.distributed as dist

    out = {}
    for name, src in owners.items():
        box = [None]
        dev = None
        if src == world.rank:
            rec, loss, deq = results[name]
            dev = deq.device
            box = [(rec, loss, deq.cpu())]
        what = f"sending the quantized '{name}'" if src == world.rank else f"receiving the quantized '{name}' from rank {src}"
        with guarded(world, what):
            dist.broadcast_object_list(box, src=src, device=world.comm_device)
        rec, loss, deq = box[0]
        out[name] = (rec, loss, deq if dev is None else deq.to(dev))
    return out


def check_supported(world: World, family, opts) -> None:
    """What the distributed path does not cover yet, as one UserError each (alone: nothing)."""
    if not world.active:
        return
    if family.experts is not None:
        raise UserError("quantizing a mixture-of-experts model across processes is not supported yet; run it in "
                        "one process (drop --nproc / torchrun)")
    if opts.calibrate and opts.nsamples < world.size:
        raise UserError(f"--nsamples {opts.nsamples} is below the {world.size} processes; every process needs a "
                        f"calibration window: pass --nsamples >= {world.size} or fewer processes")
