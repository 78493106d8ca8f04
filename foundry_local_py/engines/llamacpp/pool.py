"""The shared KV pool's policy, the half of :class:`~.runner.LlamaRunner` that decides where
sequences' KV cells come from.

The shared KV pool (the default): the context's KV cache is llama.cpp's unified cache, one pool
of ``kv_tokens`` cells all sequences draw on (``n_ctx`` = the pool, ``n_seq_max`` = slots), as
``llama-server --kv-unified`` and vLLM's block manager do: slots are only concurrency, and one
request may use up to the model's context (``EngineInfo.n_ctx`` = min(context, pool)). The pool's
cells are mirrored on the host (:class:`~.kv_pool.KvPool`: the C API does not report them).
Admission: the scheduler starts a request only when its prompt (less a prefix the pool already
holds) fits the room left after what running sequences still need (:meth:`LlamaRunner.kv_room`,
with a 1% watermark); a prompt larger than the pool is refused at validation. Overflow, one rule:
when a step's tokens do not fit, idle slots' cached sequences are dropped (least recently used
first); if that is not enough, the youngest running sequence is preempted (vLLM's recompute
preemption): its cells are freed, it keeps its slot and its sampler (grammar, penalties, RNG), and
it recomputes prompt + generated tokens as soon as room comes back, before any new request starts,
so its stream continues without a gap in its text. A sequence alone in the pool that still
cannot get a cell (only possible with a context larger than the pool) ends with
``finish_reason: length``. ``llama_decode`` returning 1 (no cells) changes nothing in the cache:

What the pool gives up: attention over a shared cache computes a sequence's logits slightly
differently depending on which cells its neighbours hold, so greedy tokens may change with load.
Deterministic mode keeps one KV stream of ``n_ctx`` cells per slot instead (slots x context of
memory) and with it the "same tokens alone or among 8" property.

What the pool costs in time: ggml's CPU flash attention runs every query row over the pool's
used span (cells up to the highest one in use), skipping only 64x64 tiles that the whole tile's
rows mask, and still converting each skipped tile's mask. A long prefill beside other long
sequences is slower than in a per-sequence stream (measured: 200 tokens beside 7 sequences of
768, 1.49-1.77 s vs 1.04 s); llama-server with ``--kv-unified`` pays the same.

KV cache types (``kv_cache_type``, :func:`~..backends.kv_types`): 'auto' stores K in q8_0 and V
in f16 on the CPU (f16 both on a GPU); f16, q8_0 or q4_0 for both, or K/V (llama.cpp's
-ctk/-ctv); a quantized V cache needs flash attention (on by default).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from ..base import LoraSet, SequenceEnd, lora_key
from ..kv_pool import KvPool
from ..prompt_cache import PromptCache, as_tokens, common_prefix
from .slot import MIN_CACHED, MIN_GAIN, N_BATCH, PREFILL_CHUNK, Slot

if TYPE_CHECKING:
    from .engine import LlamaCppEngine

log = logging.getLogger(__name__)

_MAX_SEQ = 256  # LLAMA_MAX_SEQ of this llama.cpp
_GGML_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                  "q4_0": llama_cpp.GGML_TYPE_Q4_0}


class KvPoolPolicy:
    """Mixed into :class:`~.runner.LlamaRunner`: the pool's admission room, kept sequences and
    overflow rule (module doc). The runner owns the context and the slots declared here."""

    engine: LlamaCppEngine
    max_batch: int
    n_ctx_seq: int
    _ctx: Any
    _mem: Any
    _batch: Any
    _chunk: int
    _share: bool
    _slots: list[Slot]
    _by_request: dict[str, Slot]
    _cache: PromptCache | None

    def _slot_prefixes(self, want: np.ndarray, n_prompt: int,
                       key: tuple[tuple[str, float], ...]) -> dict[int, int]:
        raise NotImplementedError

    def _own_prefix(self, slot: Slot, keep: int) -> int:
        raise NotImplementedError

    def _configure_kv(self, cparams: Any) -> None:
        """One pool of ``kv_tokens`` cells shared by every sequence (llama.cpp's unified cache),
        or, in deterministic mode, one stream of ``n_ctx`` cells per slot: attention over a
        shared stream computes a sequence's logits differently depending on its neighbours in
        the batch, so outputs would change with load (greedy included)."""
        plan = self.engine.kv_plan
        model = self.engine.model_ptr
        # Finished sequences stay in the pool's free cells under spare sequence ids (no copy, no
        # memory: the pool is allocated anyway) until their cells are needed: vLLM's cached
        # blocks. Not for sliding-window models (their cells expire) or without a pool.
        shareable = plan.pooled and not llama_cpp.llama_model_n_swa(model) > 0
        self._n_kept = min(3 * self.max_batch, _MAX_SEQ - self.max_batch) if shareable else 0
        cparams.n_ctx = plan.kv_tokens
        cparams.kv_unified = plan.pooled
        cparams.type_k, cparams.type_v = (_GGML_KV_TYPES[t] for t in plan.cache_types)

    def _init_pool(self) -> None:
        plan = self.engine.kv_plan
        self._pool = KvPool(plan.kv_tokens) if plan.pooled else None
        self._parked: dict[int, list[int]] = {}
        """Preempted sequences (seq id -> tokens to recompute: prompt + generated)."""
        self._age: dict[int, int] = {}
        self._admissions = 0
        self._kept: dict[int, list[int]] = {}
        """Finished sequences kept in the pool (seq id -> tokens), least recently used first."""
        self._kept_lora: dict[int, tuple[tuple[str, float], ...]] = {}
        """The adapter set each kept sequence's KV was computed under (reused only under it)."""
        self._spare = list(range(self.max_batch + self._n_kept - 1, self.max_batch - 1, -1))
        self._held = False
        """llama_decode found fewer cells than the mirror: no resuming until a sequence ends."""
        self.preemptions = 0

    def _admitted(self, slot: Slot) -> None:
        self._admissions += 1
        self._age[slot.seq_id] = self._admissions

    def kv_capacity(self) -> int:
        return self._pool.n_cells if self._pool is not None else self.n_ctx_seq

    def kv_need(self, prompt_tokens: Sequence[int], lora: LoraSet = ()) -> int:
        if self._pool is None or not prompt_tokens:
            return 0
        want = as_tokens(prompt_tokens)
        limit = len(prompt_tokens) - 1
        key = lora_key(lora)
        held = [s.cached for s in self._slots if (self._share or s.request_id is None) and s.lora_key == key]
        kept = [t for sid, t in self._kept.items() if self._kept_lora.get(sid, ()) == key]
        shared = max((min(common_prefix(as_tokens(t), want), limit) for t in [*held, *kept]), default=0)
        return len(prompt_tokens) - shared

    def kv_room(self) -> int:
        if self._pool is None:
            return 1 << 30
        if self._parked:  # a preempted sequence resumes before anything new starts
            return 0
        return self._room(watermark=bool(self._by_request))

    def kv_report(self) -> dict[str, Any]:
        if self._pool is None:
            return {"pooled": False, "capacity_tokens": self.n_ctx_seq * self.max_batch,
                    "cache_type": self.engine.kv_plan.cache_type}
        running = [s.seq_id for s in self._by_request.values()]
        return {"pooled": True, "capacity_tokens": self._pool.n_cells,
                "used_tokens": self._pool.held_by(running),
                "cached_tokens": self._pool.used, "free_tokens": self._pool.free,
                "kept_sequences": len(self._kept),
                "cache_type": self.engine.kv_plan.cache_type,
                "preempted": len(self._parked), "preemptions": self.preemptions}

    def _running(self) -> list[Slot]:
        return [s for s in self._by_request.values() if s.seq_id not in self._parked]

    def _room(self, *, watermark: bool) -> int:
        """Cells free or held only by idle slots, less what running sequences still need: the
        rest of their prompts, one cell each for the next step and (``watermark``) 1% of the
        pool, so a new sequence does not get preempted at once (vLLM's watermark)."""
        assert self._pool is not None
        running = self._running()
        idle = self._evictable()
        owed = sum(max(0, len(s.prompt) - len(s.cached)) for s in running) + len(running)
        reserve = self._pool.n_cells // 100 if watermark else 0
        return self._pool.free + self._pool.exclusive_to(idle) - owed - reserve

    def _prefill_room(self) -> int:
        return self._pool.free if self._pool is not None else N_BATCH

    def _fit_step(self) -> list[SequenceEnd]:
        """Make room for this step's tokens, by the pool's one overflow rule: evict idle slots'
        cached prefixes (least recently used first), then preempt the youngest running sequence
        (vLLM's recompute preemption); a sequence left alone without room ends with ``length``."""
        if self._pool is None:
            return []
        self._resume_parked()
        ended: list[SequenceEnd] = []
        while True:
            running = self._running()
            decoding = sum(1 for s in running if s.pending is not None)
            chunks = [min(len(s.prompt) - len(s.cached), self._chunk)
                      for s in sorted(running, key=lambda s: self._age[s.seq_id]) if s.prefilling]
            budget = N_BATCH - decoding if not decoding else min(N_BATCH - decoding, PREFILL_CHUNK)
            must = decoding + min(chunks[0] if chunks else 0, budget)
            wish = decoding + min(sum(chunks), budget)
            if wish > self._pool.free:
                self._evict_idle(wish - self._pool.free)
            if must <= self._pool.free:
                return ended
            if len(running) > 1:
                self._preempt(max(running, key=lambda s: self._age[s.seq_id]))
                continue
            for slot in running:  # alone and still no room (requests are validated against the pool)
                log.warning("the KV pool is full; request %s ends with finish_reason 'length'",
                            slot.request_id)
                ended.append(SequenceEnd(slot.request_id or ""))
                slot.pending = None
                slot.prompt = list(slot.cached)
            return ended

    def _evictable(self) -> list[int]:
        """Sequence ids whose cells no running sequence needs: kept ones, then idle slots."""
        return [*self._kept, *(s.seq_id for s in self._slots if s.request_id is None and s.cached)]

    def _keep_finished(self, slot: Slot) -> None:
        """Keep a finished sequence's cells in the pool under a spare id (``llama_memory_seq_cp``:
        its cells get one more owner), so a later prompt can start from it after the slot moved
        on; an entry it extends is dropped, and the least recently used one makes room."""
        if self._pool is None or not self._n_kept or len(slot.cached) < MIN_CACHED:
            return
        tokens = slot.cached
        arr = as_tokens(tokens)
        for sid, kept in list(self._kept.items()):
            if self._kept_lora.get(sid, ()) != slot.lora_key:
                continue
            n = common_prefix(as_tokens(kept), arr)
            if n == len(tokens):  # already kept
                self._kept[sid] = self._kept.pop(sid)
                return
            if n == len(kept):  # the new one extends it
                self._drop_kept(sid)
        if not self._spare:
            self._drop_kept(next(iter(self._kept)))
        sid = self._spare.pop()
        llama_cpp.llama_memory_seq_cp(self._mem, slot.seq_id, sid, 0, len(tokens))
        self._pool.share(slot.seq_id, sid, len(tokens))
        self._kept[sid] = list(tokens)
        self._kept_lora[sid] = slot.lora_key

    def _drop_kept(self, sid: int) -> int:
        assert self._pool is not None
        del self._kept[sid]
        self._kept_lora.pop(sid, None)
        llama_cpp.llama_memory_seq_rm(self._mem, sid, -1, -1)
        self._spare.append(sid)
        return self._pool.truncate(sid, 0)

    def _evict_idle(self, cells: int) -> None:
        """Drop kept sequences, then idle slots' cached sequences, least recently used first,
        until ``cells`` are freed."""
        assert self._pool is not None
        freed = 0
        for sid in list(self._kept):
            if freed >= cells:
                return
            freed += self._drop_kept(sid)
        for slot in sorted((s for s in self._slots if s.request_id is None and s.cached),
                           key=lambda s: s.last_used):
            if freed >= cells:
                return
            freed += self._drop_cells(slot, 0)

    def _drop_cells(self, slot: Slot, keep: int) -> int:
        """``slot`` keeps its first ``keep`` cached tokens; returns the pool cells freed."""
        assert self._pool is not None
        if keep < len(slot.cached) or self._pool.length(slot.seq_id) > keep:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep if keep > 0 else -1, -1)
        del slot.cached[keep:]
        return self._pool.truncate(slot.seq_id, keep)

    def _preempt(self, slot: Slot) -> None:
        """Free ``slot``'s cells; it keeps its slot and sampler (grammar, penalties and RNG state
        included) and recomputes its prompt and generated tokens when room comes back, so its
        stream continues as if nothing happened."""
        if slot.prefilling:
            tokens = list(slot.prompt)
        else:
            tokens = slot.cached + ([slot.pending] if slot.pending is not None else [])
        log.info("KV pool full: preempting request %s (%d tokens to recompute)", slot.request_id, len(tokens))
        self._drop_cells(slot, 0)
        slot.prompt = []
        slot.pending = None
        self._parked[slot.seq_id] = tokens
        self.preemptions += 1

    def _resume_parked(self) -> None:
        """Preempted sequences resume, oldest first, as soon as their tokens fit."""
        assert self._pool is not None
        if self._held:
            return
        for seq_id in sorted(self._parked, key=lambda k: self._age[k]):
            tokens = self._parked[seq_id]
            if self.kv_need(tokens, self._slots[seq_id].lora) > self._room(watermark=bool(self._running())):
                return
            slot = self._slots[seq_id]
            del self._parked[seq_id]
            want = as_tokens(tokens)
            shared = self._slot_prefixes(want, len(tokens), slot.lora_key)
            slot.prompt = tokens
            self._reuse_in_pool(slot, tokens, want, shared)

    def _no_kv_slot(self) -> list[SequenceEnd]:
        """``llama_decode`` found no cells for the batch (1): it changed nothing, so take the
        batch's tokens back out of the bookkeeping and apply the overflow rule."""
        assert self._pool is not None
        log.warning("llama_decode found no KV cells for a batch of %d tokens", self._batch.n_tokens)
        counts: dict[int, int] = {}
        for i in range(self._batch.n_tokens):
            seq = self._batch.seq_id[i][0]
            counts[seq] = counts.get(seq, 0) + 1
        for seq, n in counts.items():
            slot = self._slots[seq]
            keep = len(slot.cached) - n
            undone = slot.cached[keep]
            del slot.cached[keep:]
            self._pool.truncate(seq, keep)
            if keep >= len(slot.prompt):  # it was decoding: its sampled token goes again
                slot.pending = undone
        if self._evictable():  # the rule's first resort: cached sequences no one runs
            self._evict_idle(self._pool.n_cells)
            return []
        self._held = True
        running = self._running()
        if len(running) > 1:
            self._preempt(max(running, key=lambda s: self._age[s.seq_id]))
            return []
        ended = [SequenceEnd(s.request_id or "") for s in running]
        for slot in running:
            slot.pending = None
            slot.prompt = list(slot.cached)
        return ended

    def _reuse_in_pool(self, slot: Slot, prompt: list[int], want: np.ndarray, shared: dict[int, int]) -> int:
        """:meth:`_reuse_prefix` with the shared pool: a prefix held by another sequence (busy
        or idle) is shared with ``llama_memory_seq_cp`` (its cells get one more owner, nothing
        is copied); the host cache is read only when it holds more of the prompt."""
        assert self._pool is not None
        limit = len(prompt) - 1
        keep = self._own_prefix(slot, shared[slot.seq_id])
        donor: int | None = None
        if self._share:
            for other in self._slots:
                n = shared[other.seq_id]
                if other is not slot and n > keep and self._pool.length(other.seq_id) >= n:
                    donor, keep = other.seq_id, n
            for sid, kept in self._kept.items():
                if self._kept_lora.get(sid, ()) != slot.lora_key:
                    continue  # KV computed under another adapter set
                n = min(common_prefix(as_tokens(kept), want), limit)
                if n > keep:
                    donor, keep = sid, n
            if donor in self._kept:
                self._kept[donor] = self._kept.pop(donor)  # recently used
        found = (self._cache.lookup(want, keep + MIN_GAIN - 1, slot.lora_key)
                 if self._share and self._cache is not None else None)
        if found is not None:
            entry, n = found
            self._drop_cells(slot, 0)
            if self._pool.free + self._pool.exclusive_to(self._evictable()) >= len(entry.tokens):
                self._evict_idle(len(entry.tokens) - self._pool.free)
                buf = (ctypes.c_uint8 * len(entry.state)).from_buffer_copy(entry.state)
                if llama_cpp.llama_state_seq_set_data(self._ctx, buf, len(entry.state), slot.seq_id):
                    self._pool.append(slot.seq_id, len(entry.tokens))
                    slot.cached = [int(t) for t in entry.tokens]
                    keep = min(n, limit)
                    self._drop_cells(slot, keep)
                    slot.cached = list(prompt[:keep])
                    return keep
                log.warning("restoring a cached prompt state failed; computing the prompt")
            donor, keep = None, 0
        if donor is not None:
            self._drop_cells(slot, 0)
            llama_cpp.llama_memory_seq_cp(self._mem, donor, slot.seq_id, 0, keep)
            self._pool.share(donor, slot.seq_id, keep)
        else:
            self._drop_cells(slot, keep)
        slot.cached = list(prompt[:keep])
        return keep

