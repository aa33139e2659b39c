"""Row-chunked, threaded evaluation of the per-block fits (kquants, presets): every fit is independent per row."""
from __future__ import annotations


def map_row_chunks(fn, rows: int, n: int, chunk_elems: int = 1 << 16) -> list:
    """[fn(slice) for row slices of about chunk_elems weights], run on torch.get_num_threads() threads: the
    fits are independent per row, and a chunk's float64 temporaries stay in cache (numpy releases the GIL)."""
    import torch

    step = max(1, chunk_elems // max(n, 1))
    slices = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
    threads = min(len(slices), max(1, torch.get_num_threads()))
    if threads <= 1:
        return [fn(sl) for sl in slices]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(fn, slices))
