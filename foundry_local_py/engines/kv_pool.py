"""Host-side accounting of a shared KV pool (llama.cpp's unified KV cache).

llama.cpp's unified cache is one array of ``n_cells`` cells; a cell holds one token's keys and
values and belongs to a set of sequence ids. ``llama_decode`` places every token of a batch in an
empty cell (anywhere: cells need not be contiguous); ``llama_memory_seq_cp`` adds a sequence id
to cells that already hold another's prefix (sharing it at no cost); ``llama_memory_seq_rm``
removes a sequence id, and a cell with no sequence left is empty again. The C API does not say
how many cells are in use, so the runner mirrors every such call here: each sequence's cells are
abstract ids with reference counts, and a cell is free when no sequence refers to it. This is
what admission (does a prompt fit?) and preemption (does the next step fit?) read.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class KvPool:
    def __init__(self, n_cells: int) -> None:
        self.n_cells = n_cells
        self._ref = np.zeros(n_cells, dtype=np.int32)
        self._free: list[int] = list(range(n_cells - 1, -1, -1))
        self._cells: dict[int, list[int]] = {}

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        """Cells some sequence refers to (a cell shared by several counts once)."""
        return self.n_cells - len(self._free)

    def length(self, seq: int) -> int:
        return len(self._cells.get(seq, ()))

    def append(self, seq: int, n: int = 1) -> None:
        """``n`` new cells for ``seq`` (a decoded token each)."""
        if n > len(self._free):
            raise RuntimeError(f"KV pool accounting: {n} cells asked, {len(self._free)} free")
        take = self._free[len(self._free) - n:]
        del self._free[len(self._free) - n:]
        self._ref[take] = 1
        self._cells.setdefault(seq, []).extend(take)

    def share(self, src: int, dst: int, n: int) -> None:
        """``dst`` (empty) refers to the first ``n`` cells of ``src`` too (``llama_memory_seq_cp``)."""
        if self._cells.get(dst):
            raise RuntimeError("KV pool accounting: share into a non-empty sequence")
        ids = self._cells.get(src, [])[:n]
        if ids:
            self._ref[ids] += 1
        self._cells[dst] = list(ids)

    def truncate(self, seq: int, keep: int) -> int:
        """``seq`` keeps its first ``keep`` cells (``llama_memory_seq_rm(seq, keep, -1)``);
        returns how many cells became free."""
        cells = self._cells.get(seq)
        if not cells or keep >= len(cells):
            return 0
        gone = np.asarray(cells[keep:], dtype=np.int64)
        del cells[keep:]
        self._ref[gone] -= 1
        freed = gone[self._ref[gone] == 0]
        self._free.extend(freed.tolist())
        return len(freed)

    def held_by(self, seqs: Iterable[int]) -> int:
        """Cells at least one of ``seqs`` refers to (shared cells once)."""
        ids = [c for s in seqs for c in self._cells.get(s, ())]
        if not ids:
            return 0
        return int(np.unique(np.asarray(ids, dtype=np.int64)).size)

    def exclusive_to(self, seqs: Iterable[int]) -> int:
        """Cells that only ``seqs`` refer to: what dropping all of them would free."""
        count = np.zeros(self.n_cells, dtype=np.int32)
        for s in seqs:
            ids = self._cells.get(s)
            if ids:
                count[ids] += 1  # a sequence refers to a cell at most once
        return int(np.count_nonzero((count > 0) & (count == self._ref)))
