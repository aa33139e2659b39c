"""Run a GIL-releasing kernel over row slices on torch.get_num_threads() Python threads.

Python threads instead of numba's parallel=True: its OpenMP layer kept spinning threads that slowed torch's own
OpenMP ops afterwards by 10x+ on a 2-core box.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor


def thread_count(rows: int, min_rows: int = 16) -> int:
    """How many threads to split `rows` over: torch's thread count, at most the cores, at least min_rows each."""
    import torch

    return max(1, min(int(torch.get_num_threads()), os.cpu_count() or 1, rows // min_rows or 1))


def run_rows(fn, rows: int, args: tuple, split: tuple[int, ...], min_rows: int = 16) -> None:
    """fn(*args) with every args[i] (i in `split`) sliced to rows [a, b), over thread_count(rows) threads;
    the other arguments are passed whole. fn must release the GIL (numba nogil) to run in parallel."""
    n = thread_count(rows, min_rows)
    if n == 1:
        fn(*args)
        return
    bounds = [rows * i // n for i in range(n + 1)]

    def part(i):
        a, b = bounds[i], bounds[i + 1]
        fn(*[t[a:b] if k in split else t for k, t in enumerate(args)])

    with ThreadPoolExecutor(n) as ex:
        list(ex.map(part, range(n)))


def run_ranges(fn, rows: int, args: tuple, min_rows: int = 16) -> None:
    """fn(*args, a, b) for row ranges [a, b) splitting `rows` over thread_count(rows) threads (the arrays are
    shared; each call touches only its rows). fn must release the GIL to run in parallel."""
    n = thread_count(rows, min_rows)
    if n == 1:
        fn(*args, 0, rows)
        return
    bounds = [rows * i // n for i in range(n + 1)]
    with ThreadPoolExecutor(n) as ex:
        list(ex.map(lambda i: fn(*args, bounds[i], bounds[i + 1]), range(n)))
