"""Host-memory prompt cache: the KV state of finished sequences, found again by token prefix.

A slot keeps its last sequence's KV entries, but there are only ``max_batch`` slots. When a
sequence ends, the engine also copies its state (its cells of every layer, a few MB for a small
model) here; a later request whose prompt starts with those tokens (the same system prompt and
few-shot examples, a regenerated answer, a chat's next turn after its slot was reused) restores
them instead of computing them. The cache is bounded in bytes and evicts the least recently used
entry; an entry whose tokens extend another's replaces it. Engine-neutral: it stores opaque bytes.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two int arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def as_tokens(tokens: Sequence[int]) -> np.ndarray:
    return np.asarray(tokens, dtype=np.int32)


@dataclass
class CachedState:
    tokens: np.ndarray
    state: bytes
    key: Hashable = ()
    """What else the state was computed under (a LoRA adapter set): found only by equal keys."""


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: collections.OrderedDict[int, CachedState] = collections.OrderedDict()
        self._next_key = 0
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(
        self, prompt: np.ndarray, longer_than: int, key: Hashable = ()
    ) -> tuple[CachedState, int] | None:
        """The entry of ``key`` sharing the longest prefix with ``prompt``, if longer than
        ``longer_than``."""
        best: tuple[int, int] | None = None
        for k, entry in self._entries.items():
            if len(entry.tokens) <= longer_than or entry.tokens[0] != prompt[0] or entry.key != key:
                continue
            n = common_prefix(entry.tokens, prompt)
            if n > longer_than and (best is None or n > best[1]):
                best = (k, n)
        if best is None:
            return None
        self._entries.move_to_end(best[0])
        return self._entries[best[0]], best[1]

    def put(self, tokens: Sequence[int], state: Callable[[], bytes], key: Hashable = ()) -> None:
        """Keep ``tokens``' state (computed under ``key``). ``state()`` copies it out of the
        engine, only when needed: not when an entry already holds all of these tokens (a
        repeated request)."""
        if not tokens:
            return
        arr = as_tokens(tokens)
        extended: list[int] = []
        for k, entry in self._entries.items():
            if entry.key != key:
                continue
            n = common_prefix(entry.tokens, arr)
            if n == len(arr):  # an entry already holds all of it
                self._entries.move_to_end(k)
                return
            if n == len(entry.tokens):  # the new sequence extends this one
                extended.append(k)
        data = state()
        if len(data) > self.max_bytes:
            return
        for k in extended:
            self._drop(k)
        self._entries[self._next_key] = CachedState(arr, data, key)
        self._next_key += 1
        self.bytes += len(data)
        while self.bytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.state)
