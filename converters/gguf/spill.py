"""Packed GGUF tensors parked on disk as they are made, so the writer holds one tensor at a time, not the file.

GGUF puts every tensor's description before the data, so the exporter packs every tensor before it writes any. Each
packed tensor's bytes go to one temporary file beside the output and the tensor is kept as a read-only memory map
of its slice; gguf's writer then copies them into the file from the page cache. Small tensors (norms, biases)
stay in RAM.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL = 1 << 16  # bytes below which a tensor stays in RAM (norms, biases: a few KiB each)


class TensorSpill:
    """hold(array) -> the same values as a read-only memory map of a temporary file (deleted by close())."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._offset = 0

    def hold(self, data: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(data)
        if a.nbytes < SMALL:
            return a
        a.tofile(self._f)
        self._f.flush()
        mm = np.memmap(self.path, dtype=a.dtype, mode="r", offset=self._offset, shape=a.shape)
        self._offset += a.nbytes
        return mm

    def close(self) -> None:
        self._f.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> "TensorSpill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
