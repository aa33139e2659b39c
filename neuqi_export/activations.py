"""The calibration hidden states between blocks, kept in RAM up to a budget and spilled to a disk file beyond it.

Every window's hidden state (1, seqlen, hidden) has the same shape and dtype, so the store is a list of slots: the
first ones in RAM while their bytes fit the budget, the rest in one memory-mapped file of fixed-size slots (raw
bytes, so bf16/fp16 stay as they are). Reading a spilled window gives back the same tensor bit for bit, so a run
that spills computes exactly what one that does not computes; only the time and the memory differ.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def default_budget() -> int:
    """Bytes of activations kept in RAM by default: half of the free memory (a block's inputs and outputs are both
    alive while the next inputs are computed)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 1 << 31


class Activations:
    """A list of same-shaped CPU tensors (one per calibration window): append, len, index, iterate."""

    def __init__(self, budget: int | None = None, spill_dir: Path | None = None, name: str = "activations"):
        self.budget = default_budget() if budget is None else max(0, int(budget))
        self.spill_dir, self.name = spill_dir, name
        self._ram: list[torch.Tensor] = []
        self._file: Path | None = None
        self._mm: np.memmap | None = None
        self._n_disk = 0
        self._shape = self._dtype = None
        self._slot = 0

    def __len__(self) -> int:
        return len(self._ram) + self._n_disk

    @property
    def spilled(self) -> int:
        """Windows held on disk."""
        return self._n_disk

    def append(self, x: torch.Tensor) -> None:
        x = x.detach().cpu().contiguous()
        if self._shape is None:
            self._shape, self._dtype = tuple(x.shape), x.dtype
            self._slot = x.numel() * x.element_size()
        elif tuple(x.shape) != self._shape or x.dtype != self._dtype:
            raise ValueError(f"window of shape {tuple(x.shape)} {x.dtype} in a store of {self._shape} {self._dtype}")
        if self._n_disk == 0 and (len(self._ram) + 1) * self._slot <= self.budget:
            self._ram.append(x)
            return
        self._write(x)

    def _write(self, x: torch.Tensor) -> None:
        if self._mm is None or self._n_disk == self._mm.shape[0]:
            self._grow(max(8, 2 * self._n_disk))
        self._mm[self._n_disk] = x.view(-1).view(torch.uint8).numpy()
        self._n_disk += 1

    def _grow(self, slots: int) -> None:
        """(Re)map the spill file with room for `slots` windows, keeping what it holds."""
        if self._file is None:
            d = Path(self.spill_dir) if self.spill_dir is not None else None
            if d is not None:
                d.mkdir(parents=True, exist_ok=True)
            import tempfile

            fd, path = tempfile.mkstemp(prefix=f".{self.name}-", suffix=".bin", dir=d)
            os.close(fd)
            self._file = Path(path)
        if self._mm is not None:
            self._mm.flush()
            self._mm = None
        os.truncate(self._file, slots * self._slot)  # sparse until written
        self._mm = np.memmap(self._file, dtype=np.uint8, mode="r+", shape=(slots, self._slot))

    def __getitem__(self, i: int) -> torch.Tensor:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i < len(self._ram):
            return self._ram[i]
        raw = torch.from_numpy(np.array(self._mm[i - len(self._ram)]))
        return raw.view(self._dtype).reshape(self._shape)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def close(self) -> None:
        """Free the RAM windows and delete the spill file."""
        self._ram.clear()
        self._mm = None
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            self._file = None
        self._n_disk = 0

    def __del__(self):  # a store dropped without close() still removes its file
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
