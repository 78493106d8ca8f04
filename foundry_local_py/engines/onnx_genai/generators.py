"""One ``og.Generator`` per sequence, each advanced by one token per step, and prefix reuse.

When a greedy sequence ends its generator is kept (``prompt_cache_mib`` of KV per model, default
64 MiB); a later greedy prompt sharing 16 or more tokens with a kept one rewinds that generator to
the shared prefix (``Generator.rewind_to``) and prefills only the rest. The rest is always at least
2 tokens: onnxruntime's kernels compute a prefill of two or more rows row for row alike, but a
one-row prefill takes the decode kernels, which round differently. So a reused prefix gives
bitwise the logits of a fresh prefill, and the same tokens as alone
(``tests/integration/test_batch_invariance.py``). llama.cpp's slots and vLLM's prefix cache do the
same with their KV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime_genai as og

from ...errors import EngineError
from ..base import GenerationRequest, SamplingParams, SequenceFailure, TokenOutput
from ..prompt_cache import common_prefix
from .common import Budget, constraint_to_guidance, finish_outputs, plan_budget, seed, start_error

if TYPE_CHECKING:
    from .engine import OrtGenaiEngine

log = logging.getLogger(__name__)

MIN_REUSE = 16
"""Prompt tokens a kept generator must share with a new prompt to serve it."""
MIN_FRESH = 2
"""Prompt tokens always computed anew on a reused generator: a one-row prefill takes the decode
kernels, whose roundings differ from those of a prefill of two or more rows (which give each row
bitwise the same result whatever rows surround it)."""
CAPACITY_STEP = 256
"""A reusable generator's KV buffer is sized up to a multiple of this, so a later prompt that
extends its own fits in it."""


def reuse_key(sp: SamplingParams) -> tuple[float] | None:
    """The search options under which a kept generator's KV may serve a request, or None when
    it may not: only greedy, unconstrained requests (a sampler's RNG state and a grammar's state
    cannot be rewound). Requests with the same key behave alike on the same KV."""
    if sp.temperature > 0.0 or sp.constraint is not None:
        return None
    return (float(sp.repeat_penalty) if sp.repeat_penalty > 0 else 1.0,)


@dataclass(eq=False)
class _Kept:
    """A finished sequence's generator, kept for a later prompt that starts like its own."""

    generator: Any
    tokens: list[int]
    """The prompt whose KV it holds: every position computed by a prefill of >= MIN_FRESH rows
    (generated tokens are not reused: the decode kernels computed their KV)."""
    capacity: int
    """Its KV buffer (``max_length``), in tokens."""
    key: tuple[float]


@dataclass(eq=False)
class _GenSeq:
    request_id: str
    generator: Any
    stream: Any
    prompt: list[int] | None
    """Prompt still to feed (the first step prefills)."""
    budget: Budget
    tokens: list[int]
    """The whole prompt."""
    capacity: int
    key: tuple[float] | None
    """:func:`reuse_key`; None: not kept when it ends."""
    generated: int = 0
    failed: bool = False


class GeneratorRunner:
    """One og.Generator per sequence, each advanced by one token per step (no batched compute);
    finished greedy sequences' generators are kept for prefix reuse (module doc), least recently
    used first out, within ``kept_bytes`` of KV."""

    def __init__(self, owner: OrtGenaiEngine) -> None:
        self.owner = owner
        self.max_batch = owner.options.max_batch
        self._seqs: dict[str, _GenSeq] = {}
        self._kept: list[_Kept] = []
        """Least recently used first."""
        per_token = owner.kv_bytes_per_token
        self._kept_tokens = owner.options.kept_bytes // per_token if per_token > 0 else 0
        """Bound on the kept generators' capacities (0: no reuse, also when the model's config
        does not say how large its KV is)."""

    def active(self) -> int:
        return len(self._seqs)

    def has(self, request_id: str) -> bool:
        return request_id in self._seqs

    def reserved(self) -> int:
        """KV tokens the running generators were sized for."""
        return sum(seq.budget.session for seq in self._seqs.values())

    def kv_usage(self) -> float:
        return self.reserved() / (self.owner.n_ctx * self.max_batch)

    def reuses(self, request: GenerationRequest) -> bool:
        """True when this request's generator would be kept for reuse when it ends."""
        return self._kept_tokens >= CAPACITY_STEP and reuse_key(request.sampling) is not None

    def add(self, request: GenerationRequest) -> int:
        if request.request_id in self._seqs:
            raise EngineError("duplicate request id")
        budget = plan_budget(self.owner, request)
        prompt = list(request.prompt_tokens)
        key = reuse_key(request.sampling) if self.reuses(request) else None
        capacity = budget.session
        if key is not None:
            # Room for a later prompt that extends this one.
            capacity = max(budget.session, min(self.owner.n_ctx,
                                               -(-budget.session // CAPACITY_STEP) * CAPACITY_STEP))
            crowded = sum(k.capacity for k in self._kept) + capacity > self._kept_tokens
            hit = self._take(prompt, budget.session, key, partial=crowded)
            if hit is not None:
                kept, shared = hit
                self._seqs[request.request_id] = _GenSeq(
                    request.request_id, kept.generator, self.owner.create_stream(), prompt[shared:],
                    budget, prompt, kept.capacity, key)
                return shared
        generator = self._new_generator(request.sampling, capacity)
        self._seqs[request.request_id] = _GenSeq(
            request.request_id, generator, self.owner.create_stream(), prompt, budget, prompt,
            capacity, key)
        return 0

    def _new_generator(self, sp: SamplingParams, capacity: int) -> Any:
        params = og.GeneratorParams(self.owner.model)
        search: dict[str, Any] = {"max_length": capacity, "do_sample": sp.temperature > 0.0}
        if sp.temperature > 0.0:
            search.update(temperature=float(sp.temperature), top_p=min(max(float(sp.top_p), 1e-6), 1.0),
                          top_k=max(int(sp.top_k), 0), random_seed=seed(sp) % (1 << 31))
        if sp.repeat_penalty > 0 and sp.repeat_penalty != 1.0:
            search["repetition_penalty"] = float(sp.repeat_penalty)
        guidance = constraint_to_guidance(sp.constraint) if sp.constraint is not None else None
        try:
            params.set_search_options(**search)
            if guidance is not None:
                params.set_guidance(*guidance)
            return og.Generator(self.owner.model, params)
        except Exception as exc:
            raise start_error(exc, guidance is not None) from exc

    def _take(self, prompt: list[int], session: int, key: tuple[float], *,
              partial: bool) -> tuple[_Kept, int] | None:
        """The kept generator sharing the longest prefix with ``prompt`` (at least MIN_REUSE
        tokens, at most all but MIN_FRESH), rewound to it; None when none qualifies.

        Taking a generator ends its own prompt's reuse. So one whose whole prompt ``prompt``
        repeats or extends (a repeat, a conversation's next turn) is taken first, and one that
        shares less (a system prompt) only when ``partial``: when keeping one more generator
        would push another out anyway (llama-server likewise reuses a slot only for a similar
        prompt)."""
        best: tuple[bool, int, int] | None = None
        want = np.asarray(prompt, dtype=np.int64)
        for i, kept in enumerate(self._kept):
            if kept.key != key or kept.capacity < session:
                continue
            common = common_prefix(np.asarray(kept.tokens, dtype=np.int64), want)
            whole = common == len(kept.tokens)
            shared = min(common, len(prompt) - MIN_FRESH)
            if shared < MIN_REUSE or not (whole or partial):
                continue
            if best is None or (whole, shared) > best[:2]:
                best = (whole, shared, i)
        if best is None:
            return None
        _, shared, i = best
        kept = self._kept.pop(i)
        try:
            kept.generator.rewind_to(shared)
        except Exception as exc:
            log.warning("could not rewind a kept og.Generator (%s); prefilling anew", exc)
            return None
        return kept, shared

    def _keep(self, seq: _GenSeq) -> None:
        if seq.key is None or seq.failed or seq.prompt is not None:
            return  # not greedy, failed, or its prompt never reached the model
        self._kept.append(_Kept(seq.generator, seq.tokens, seq.capacity, seq.key))
        while self._kept and sum(k.capacity for k in self._kept) > self._kept_tokens:
            self._kept.pop(0)

    def remove(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self._keep(seq)  # else dropping the generator frees its KV cache

    def step(self) -> list[TokenOutput | SequenceFailure]:
        outputs: list[TokenOutput | SequenceFailure] = []
        for seq in list(self._seqs.values()):
            if seq.budget.max_new <= seq.generated:
                continue
            try:
                if seq.prompt is not None:
                    seq.generator.append_tokens(np.asarray(seq.prompt, dtype=np.int32))
                    seq.prompt = None
                seq.generator.generate_next_token()
                token = int(seq.generator.get_next_tokens()[0])
            except Exception as exc:
                log.error("og.Generator step failed: %s", exc)
                seq.generated = seq.budget.max_new
                seq.failed = True
                outputs.append(SequenceFailure(seq.request_id, EngineError(
                    "the inference engine could not decode this sequence")))
                continue
            seq.generated += 1
            if self.owner.is_eos(token):
                seq.generated = seq.budget.max_new
                outputs.append(TokenOutput(seq.request_id, token, b"", end_of_generation=True))
                continue
            outputs.append(TokenOutput(seq.request_id, token, str(seq.stream.decode(token)).encode("utf-8")))
            if seq.generated >= seq.budget.max_new or seq.generator.is_done():
                seq.generated = seq.budget.max_new
                outputs.extend(finish_outputs(seq.request_id, "MAX_GENERATED_TOKENS", seq.budget,
                                               self.owner.eos_token))
        return outputs

    def close(self) -> None:
        self._seqs.clear()
        self._kept.clear()

