"""Row-chunked, threaded fits (converters/gguf/chunked.py): the same bytes whatever the chunking and thread count."""
import numpy as np
import pytest
import torch

from converters.gguf import chunked, codebook, kquants
from converters.gguf.types import TYPES


def _fits(w, h):
    out = [kquants.fit_k_params(w, h, TYPES[t].k) for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K")]
    out.append(kquants.fit_affine_blocks(w.reshape(w.shape[0], -1, 32), h.reshape(1, -1, 32), 16))
    out.append(codebook.fit_codebook_blocks(w.reshape(w.shape[0], -1, 32), h.reshape(1, -1, 32), codebook.KVALUES_IQ4NL))
    return out


def _flat(x):
    return [a for v in x for a in (_flat(v) if isinstance(v, (tuple, list)) else [np.asarray(v)])]


@pytest.mark.parametrize("chunk_elems,threads", [(512, 2), (3000, 1), (1 << 20, 2)])
def test_chunking_changes_no_bit(monkeypatch, chunk_elems, threads):
    """One chunk on one thread is the unchunked fit; every other split must give identical arrays."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(4, (37, 512)) * 0.02
    w[2, :64] = 0.0  # flat blocks
    h = rng.uniform(0.05, 4, 512)
    orig = chunked.map_row_chunks
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(chunked, "map_row_chunks", lambda fn, r, n, ce=1 << 30: orig(fn, r, n, ce))
        ref = _flat(_fits(w, h))
        torch.set_num_threads(threads)
        monkeypatch.setattr(chunked, "map_row_chunks", lambda fn, r, n, ce=chunk_elems: orig(fn, r, n, ce))
        got = _flat(_fits(w, h))
    finally:
        torch.set_num_threads(prev)
    assert len(got) == len(ref) and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, ref))


def test_map_row_chunks_covers_rows_in_order():
    seen = chunked.map_row_chunks(lambda sl: list(range(sl.start, sl.stop)), 103, 10, chunk_elems=70)
    assert [i for part in seen for i in part] == list(range(103)) and len(seen) == 15
