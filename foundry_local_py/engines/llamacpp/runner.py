"""The runner: continuous batching on one llama.cpp context.

We drive ``llama_decode`` ourselves instead of using ``llama_cpp.Llama``: one context holds
``max_batch`` sequences, and every :meth:`LlamaRunner.step` builds a single batch with one decode
token per generating sequence plus a chunk of prompt tokens of sequences still in prefill. That is
continuous batching with chunked prefill, as llama.cpp's own ``llama-server`` does it.

Prefix caching: each slot remembers the tokens whose KV entries it holds (also after its request
ended); in the pool, finished sequences also stay in its free cells under spare sequence ids
until those cells are needed, and may also be copied to a host-memory :class:`PromptCache`
(``prompt_cache_mib``; by default only with per-slot streams, 1/8 of the KV cache's bytes). A
new request starts from the longest prefix of its prompt found in its own slot (a chat's previous
turn), in another slot (busy or idle), in a kept sequence or in the host cache. In the pool a
prefix held by another sequence is shared with ``llama_memory_seq_cp``: its cells get one more
owner, nothing is copied and no memory is used; with per-slot streams, and from the host cache,
the state is copied (``llama_state_seq_get/set_data``), then cut to the shared prefix. A system
prompt common to all requests is computed once, not once per slot.

Deterministic mode (``LlamaCppOptions.deterministic``): the same request gives the same tokens
whatever else runs, is cached or arrived first. Measured on this build (ggml CPU, SmolLM2 Q4_1,
bit-exact logits of every row compared), what makes a token's KV differ in the last bits is how
many of its own sequence's tokens were in the same ``llama_decode``: with flash attention, 64 or
more take another kernel path than 1 to 63 (a prompt prefilled as 256 + 44 tokens and as 300
differs in rows 256-299; 200 + 56 + 44 differs from 256 + 44 in rows 200-255; with flash
attention off the difference disappears). Within 1 to 63 the bits do not depend on the split: 300
tokens decoded one by one, in chunks of 32, or 256-then-12 + 32 give identical rows; nor on other
sequences' rows in the same call (up to 40 decode rows beside a chunk, 74 rows in all). So in
the default mode, KV computed token by token while decoding (a chat's previous answer) or in
small chunks is not what a fresh prefill of a long prompt computes, and reusing it (own slot,
other slot, host cache) changes later greedy tokens. The mode prefills at most
:data:`DET_CHUNK` tokens of a sequence per ``llama_decode`` (a step may make several calls):
every cell is then computed on the same path, so a reused prefix is bit-identical to
recomputing it and prefix reuse stays on in full. Sampling RNGs are per sequence, seeded from the
request only (as in the default mode). GPU offload is refused in this mode (its kernels depend
on the batch size; not verified). The mode uses per-slot KV streams (no shared pool).
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from ...errors import ContextLengthExceededError, EngineError, ModelLoadError
from ..base import GenerationRequest, LoraSet, SequenceEnd, SequenceFailure, TokenOutput, lora_key
from ..prompt_cache import PromptCache, as_tokens, common_prefix
from .pool import KvPoolPolicy
from .sampling import make_sampler, top_logprobs
from .slot import DET_CHUNK, MIN_CACHED, MIN_GAIN, N_BATCH, PREFILL_CHUNK, Slot

if TYPE_CHECKING:
    from .engine import LlamaCppEngine

log = logging.getLogger(__name__)


def _same(a: list[Any], b: list[Any]) -> bool:
    """The same adapter handles (by identity), in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))



class LlamaRunner(KvPoolPolicy):
    def __init__(self, engine: LlamaCppEngine) -> None:
        self.engine = engine
        opts = engine.options
        self.max_batch = opts.max_batch
        self.n_ctx_seq = engine.info.n_ctx
        self._chunk = DET_CHUNK if opts.deterministic else N_BATCH
        cparams = llama_cpp.llama_context_default_params()
        self._configure_kv(cparams)
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = self.max_batch + self._n_kept
        cparams.n_threads = opts.n_threads
        cparams.n_threads_batch = opts.n_threads
        cparams.no_perf = True
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if opts.flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        )
        ctx = llama_cpp.llama_init_from_model(engine.model_ptr, cparams)
        if not ctx:
            raise ModelLoadError("could not create a llama.cpp context (out of memory?)")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self._slots = [Slot(seq_id=i) for i in range(self.max_batch)]
        self._by_request: dict[str, Slot] = {}
        self._tick = 0
        self._n_vocab = engine.n_vocab
        model = engine.model_ptr
        self._n_swa = max(0, llama_cpp.llama_model_n_swa(model))
        # A recurrent state cannot be cut back to a prefix or shared: only its own slot's cache.
        self._share = not (llama_cpp.llama_model_is_recurrent(model)
                           or llama_cpp.llama_model_is_hybrid(model))
        # Sliding-window caches forget old positions: a saved state may lack the window before
        # the shared prefix's end, so such models reuse only their own slot's cache.
        self._share = self._share and not self._n_swa
        cache_bytes = engine.kv_plan.prompt_cache_bytes
        self._cache = PromptCache(cache_bytes) if self._share and cache_bytes > 0 else None
        self._ctx_lora: tuple[tuple[str, float], ...] = ()
        """The adapter set on the context now (``llama_set_adapters_lora`` is called on a change)."""
        self._ctx_ptrs: list[Any] = []
        """Those adapters' handles (a re-loaded adapter has the same key but another handle)."""
        self._steps = 0
        self._init_pool()

    # --- protocol -----------------------------------------------------------------------

    def kv_usage(self) -> float:
        """Tokens in the KV streams of running sequences / the context's cells (n_ctx x slots).

        An idle slot's cells (its last sequence, kept for prefix reuse) count as free: the next
        request that takes the slot overwrites them, as vLLM counts evictable cached blocks.
        With the shared pool: cells held by running sequences (shared cells once) / the pool."""
        if self._pool is not None:
            return self._pool.held_by(s.seq_id for s in self._by_request.values()) / self._pool.n_cells
        used = sum(len(s.cached) for s in self._by_request.values())
        return used / (self.n_ctx_seq * self.max_batch)

    def add(self, request: GenerationRequest) -> int:
        """Start a sequence; returns how many prompt tokens came from the prefix cache."""
        prompt = request.prompt_tokens
        if not 0 < len(prompt) < self.n_ctx_seq:  # validation keeps such requests out
            raise EngineError(f"a prompt of {len(prompt)} tokens does not fit this runner")
        want = as_tokens(prompt)
        key = lora_key(request.lora)  # KV computed under another adapter set is not reused
        shared = self._slot_prefixes(want, len(prompt), key)
        slot = self._pick_slot(shared)
        ptrs = self.engine.acquire_loras(request.lora) if request.lora else []
        try:
            sampler = make_sampler(request.sampling, self._n_vocab, self.engine.vocab_ptr)
        except BaseException:
            self.engine.release_loras(request.lora, ptrs)
            raise
        slot.lora, slot.lora_key, slot.lora_ptrs, slot.served = request.lora, key, ptrs, self._steps
        keep = self._reuse_prefix(slot, prompt, want, shared)
        slot.prompt = list(prompt)
        slot.pending = None
        slot.request_id = request.request_id
        slot.sampler = sampler
        sp = request.sampling
        slot.greedy = (sp.temperature <= 0.0 and sp.constraint is None and not sp.logit_bias
                       and sp.repeat_penalty == 1.0 and not sp.frequency_penalty and not sp.presence_penalty)
        slot.top_logprobs = sp.top_logprobs
        self._by_request[request.request_id] = slot
        self._admitted(slot)
        return keep

    def remove(self, request_id: str) -> None:
        slot = self._by_request.pop(request_id, None)
        if slot is None:
            return
        if slot.sampler:
            llama_cpp.llama_sampler_free(slot.sampler)
        slot.sampler = None
        slot.request_id = None
        slot.pending = None
        self._parked.pop(slot.seq_id, None)
        self._held = False
        self._keep_finished(slot)
        if self._cache is not None and len(slot.cached) >= MIN_CACHED:
            self._cache.put(slot.cached, lambda: self._state_of(slot), slot.lora_key)
        self._release_lora(slot)
        self._tick += 1
        slot.last_used = self._tick

    def step(self) -> list[TokenOutput | SequenceFailure | SequenceEnd]:
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[TokenOutput | SequenceFailure | SequenceEnd] = []
        outputs += self._fit_step()
        logit_rows: list[tuple[Slot, int]] = []  # (slot, batch index with logits)
        in_batch: list[Slot] = []
        group = self._pick_lora_group()  # one adapter set per llama_decode
        decoding = [s for s in self._slots
                    if s.request_id is not None and s.pending is not None and s.lora_key == group]
        for slot in decoding:
            if len(slot.cached) >= self.n_ctx_seq:
                outputs.append(SequenceFailure(slot.request_id or "", ContextLengthExceededError(
                    f"the sequence reached the context length ({self.n_ctx_seq} tokens)")))
                continue
            assert slot.pending is not None
            logit_rows.append((slot, self._push(slot, slot.pending, True)))
            in_batch.append(slot)
            slot.pending = None
        budget = N_BATCH - batch.n_tokens
        if decoding:
            budget = min(budget, PREFILL_CHUNK)
        budget = min(budget, self._prefill_room())
        while True:
            for slot in self._slots:
                if budget <= 0:
                    break
                if not slot.prefilling or slot.lora_key != group:
                    continue
                start = len(slot.cached)
                take = min(budget, len(slot.prompt) - start, self._chunk)
                in_batch.append(slot)
                for j in range(take):
                    last = start + j == len(slot.prompt) - 1
                    idx = self._push(slot, slot.prompt[start + j], last)
                    if last:
                        logit_rows.append((slot, idx))
                budget -= take
            if batch.n_tokens == 0:
                return outputs
            self._use_lora(in_batch)
            rc = llama_cpp.llama_decode(self._ctx, batch)
            if rc == 1 and self._pool is not None:
                outputs += self._no_kv_slot()
                return outputs
            if rc != 0:
                log.error("llama_decode returned %d", rc)
                # Roll back what this batch added and fail the sequences that were in it.
                for slot in in_batch:
                    self._reset_slot_cache(slot)
                    outputs.append(SequenceFailure(slot.request_id or "", EngineError(
                        "the inference engine could not decode this batch")))
                return outputs
            for slot, idx in logit_rows:
                outputs.append(self._sample(slot, idx))
            # Deterministic mode: the rest of the step's prompt budget in further calls of at
            # most DET_CHUNK tokens per sequence (a prompt arriving alone is still computed in
            # one step, so requests arriving next find it cached).
            if self._chunk >= N_BATCH or budget <= 0 or not any(s.prefilling for s in self._slots):
                return outputs
            batch.n_tokens = 0
            logit_rows = []
            in_batch = []

    def close(self) -> None:
        for slot in self._slots:
            if slot.sampler:
                llama_cpp.llama_sampler_free(slot.sampler)
                slot.sampler = None
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)

    # --- helpers ------------------------------------------------------------------------

    def _push(self, slot: Slot, token: int, logits: bool) -> int:
        if self._pool is not None:
            self._pool.append(slot.seq_id)
        b = self._batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = len(slot.cached)
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = slot.seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1
        slot.cached.append(token)
        return i

    def _pick_lora_group(self) -> tuple[tuple[str, float], ...]:
        """The adapter set decoded this step: the group whose least recently decoded sequence
        waited longest (groups take turns; with the base alone it is always the base)."""
        best: Slot | None = None
        for s in self._slots:
            runnable = s.request_id is not None and (s.pending is not None or s.prefilling)
            if runnable and (best is None or s.served < best.served):
                best = s
        return best.lora_key if best is not None else ()

    def _use_lora(self, slots: list[Slot]) -> None:
        """Put ``slots``' adapter set (one set: see :meth:`step`) on the context if it changed."""
        self._steps += 1
        for s in slots:
            s.served = self._steps
        if slots and (slots[0].lora_key != self._ctx_lora or not _same(slots[0].lora_ptrs, self._ctx_ptrs)):
            self._set_lora(slots[0].lora_ptrs, slots[0].lora)

    def _set_lora(self, ptrs: list[Any], lora: LoraSet) -> None:
        n = len(ptrs)
        arr = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*ptrs) if n else None
        scales = (ctypes.c_float * n)(*(r.scale for r in lora)) if n else None
        if llama_cpp.llama_set_adapters_lora(self._ctx, arr, n, scales) != 0:
            raise EngineError("the inference engine could not apply the LoRA adapters")
        self._ctx_lora, self._ctx_ptrs = lora_key(lora), list(ptrs)

    def _release_lora(self, slot: Slot) -> None:
        """Release a finished sequence's adapters, first taking them off the context when no
        running sequence uses the context's set (so that an unused adapter is on no context)."""
        if not slot.lora_ptrs:
            return
        if self._ctx_ptrs and not any(_same(s.lora_ptrs, self._ctx_ptrs) for s in self._by_request.values()):
            self._set_lora([], ())
        self.engine.release_loras(slot.lora, slot.lora_ptrs)
        slot.lora_ptrs = []

    def _reset_slot_cache(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        if self._pool is not None:
            self._pool.truncate(slot.seq_id, 0)
        slot.cached = []

    def _slot_prefixes(self, want: np.ndarray, n_prompt: int,
                       key: tuple[tuple[str, float], ...]) -> dict[int, int]:
        """Per slot: how many of the prompt's tokens its cache holds under adapter set ``key``
        (never the last: its logits are needed); 0 for a slot whose KV is another set's."""
        return {s.seq_id: min(common_prefix(as_tokens(s.cached), want), n_prompt - 1)
                if s.lora_key == key else 0 for s in self._slots}

    def _own_prefix(self, slot: Slot, keep: int) -> int:
        """``keep`` tokens of ``slot``'s own cache, or 0 when the sliding window before the
        prefix's end is no longer in its sliding-window cache."""
        if keep > 0 and self._n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, slot.seq_id)
            if pos_min > max(0, keep - self._n_swa):
                return 0
        return keep

    def _reuse_prefix(self, slot: Slot, prompt: list[int], want: np.ndarray, shared: dict[int, int]) -> int:
        """Make ``slot``'s cache hold the longest cached prefix of ``prompt`` (``want`` as an
        array; ``shared`` as computed by :meth:`add`); returns its length."""
        if self._pool is not None:
            return self._reuse_in_pool(slot, prompt, want, shared)
        limit = len(prompt) - 1
        keep = self._own_prefix(slot, shared[slot.seq_id])
        state: bytes | None = None
        if self._share:
            # Copying a state costs far less than computing a few tokens: take it from elsewhere
            # when that saves at least MIN_GAIN of them.
            floor = keep + MIN_GAIN - 1
            donor: Slot | None = None
            for other in self._slots:
                n = shared[other.seq_id]
                if other is not slot and n > floor:
                    donor, keep, floor = other, n, n
            found = self._cache.lookup(want, floor, slot.lora_key) if self._cache is not None else None
            if found is not None:
                state, keep = found[0].state, min(found[1], limit)
            elif donor is not None:
                state = self._state_of(donor)
        if state is not None:
            buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
            if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(state), slot.seq_id) == 0:
                log.warning("restoring a cached prompt state failed; computing the prompt")
                keep = 0
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1)
        elif keep < len(slot.cached) and not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
            # A recurrent cache cannot drop a suffix: start over.
            keep = 0
        if keep == 0:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.cached = list(prompt[:keep])
        return keep


    def _state_of(self, slot: Slot) -> bytes:
        """A copy of ``slot``'s KV entries (all layers), as llama.cpp serialises a sequence."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot.seq_id)
        return bytes(buf)[:n]

    def _pick_slot(self, shared: dict[int, int]) -> Slot:
        """The free slot whose cache holds most of the prompt; the least recently used on ties."""
        free = [s for s in self._slots if s.request_id is None]
        if not free:
            raise EngineError("no free sequence slot")
        return max(free, key=lambda s: (shared[s.seq_id], -s.last_used))

    def _sample(self, slot: Slot, idx: int) -> TokenOutput:
        request_id = slot.request_id or ""
        scorer = None
        if slot.top_logprobs is not None:
            scorer = top_logprobs(llama_cpp.llama_get_logits_ith(self._ctx, idx), self._n_vocab,
                                  slot.top_logprobs, self.engine.token_piece)
        if slot.greedy:
            # The same choice as llama.cpp's greedy sampler, without copying the whole vocabulary
            # into a candidates array first (~0.1 ms a token at 49k entries).
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, idx)
            token = int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, idx)
        logprobs = scorer(token) if scorer is not None else None
        if self.engine.is_eog(token):
            return TokenOutput(request_id, token, b"", end_of_generation=True, logprobs=logprobs)
        slot.pending = token
        return TokenOutput(request_id, token, self.engine.token_piece(token), logprobs=logprobs)
