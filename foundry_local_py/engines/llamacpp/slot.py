"""One sequence of a runner (:class:`Slot`) and the batch geometry the runner and the pool share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base import LoraSet

PREFILL_CHUNK = 256  # prompt tokens per step while other sequences are decoding
N_BATCH = 512
MIN_GAIN = 4  # prompt tokens a state copy must save to be worth it
MIN_CACHED = 8  # shorter sequences are not worth a place in the host prompt cache
DET_CHUNK = 32
"""Deterministic mode: most prompt tokens of one sequence per ``llama_decode`` (under 64: one path)."""


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)
    """Tokens whose KV entries are in this sequence's cache, in order."""
    request_id: str | None = None
    prompt: list[int] = field(default_factory=list)
    pending: int | None = None
    """Sampled token not yet decoded (goes into the next batch)."""
    sampler: Any = None
    greedy: bool = False
    """Plain argmax (temperature 0, nothing else in the chain): sampled with numpy directly."""
    top_logprobs: int | None = None
    last_used: int = 0
    lora: LoraSet = ()
    """The adapter set of this slot's sequence; its cached KV was computed under it."""
    lora_key: tuple[tuple[str, float], ...] = ()
    lora_ptrs: list[Any] = field(default_factory=list)
    """The adapters' handles, held while the sequence runs."""
    served: int = 0
    """The runner step that last decoded this sequence (picks the next adapter group)."""

    @property
    def prefilling(self) -> bool:
        return self.request_id is not None and len(self.cached) < len(self.prompt)

