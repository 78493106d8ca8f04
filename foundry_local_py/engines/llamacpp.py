"""llama.cpp engine (GGUF), on llama-cpp-python's low-level bindings.

We drive ``llama_decode`` ourselves instead of using ``llama_cpp.Llama``: one context holds
``max_batch`` sequences, and every :meth:`_LlamaRunner.step` builds a single batch with one decode
token per generating sequence plus a chunk of prompt tokens of sequences still in prefill. That is
continuous batching with chunked prefill, as llama.cpp's own ``llama-server`` does it.

The shared KV pool (the default): the context's KV cache is llama.cpp's unified cache, one pool
of ``kv_tokens`` cells all sequences draw on (``n_ctx`` = the pool, ``n_seq_max`` = slots), as
``llama-server --kv-unified`` and vLLM's block manager do: slots are only concurrency, and one
request may use up to the model's context (``EngineInfo.n_ctx`` = min(context, pool)). The pool's
cells are mirrored on the host (:class:`~.kv_pool.KvPool`: the C API does not report them).
Admission: the scheduler starts a request only when its prompt (less a prefix the pool already
holds) fits the room left after what running sequences still need (:meth:`_LlamaRunner.kv_room`,
with a 1% watermark); a prompt larger than the pool is refused at validation. Overflow, one rule:
when a step's tokens do not fit, idle slots' cached sequences are dropped (least recently used
first); if that is not enough, the youngest running sequence is preempted (vLLM's recompute
preemption): its cells are freed, it keeps its slot and its sampler (grammar, penalties, RNG), and
it recomputes prompt + generated tokens as soon as room comes back, before any new request starts,
so its stream continues without a gap in its text. A sequence alone in the pool that still
cannot get a cell (only possible with a context larger than the pool) ends with
``finish_reason: length``. ``llama_decode`` returning 1 (no cells) changes nothing in the cache:
the batch's tokens are taken back and the same rule applies.

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

What the pool gives up: attention over a shared cache computes a sequence's logits slightly
differently depending on which cells its neighbours hold, so greedy tokens may change with load.
Deterministic mode keeps one KV stream of ``n_ctx`` cells per slot instead (slots x context of
memory) and with it the "same tokens alone or among 8" property.

KV cache type (``kv_cache_type``): f16, q8_0 or q4_0 for both K and V (llama.cpp's -ctk/-ctv);
a quantized V cache needs flash attention (on by default).

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

Sampling uses llama.cpp's sampler chains (one per sequence): logit bias, penalties, grammar
(structured output), top-k, top-p, min-p, temperature, seeded dist / greedy.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_grammar

from ..errors import ContextLengthExceededError, EngineError, InvalidRequestError, ModelLoadError
from .backends import LLAMA_CPP, EngineOptions, KvPlan, plan_kv
from .base import (
    ChatTemplateSpec,
    Constraint,
    EngineInfo,
    GenerationRequest,
    LoraRef,
    LoraSet,
    SamplingParams,
    SequenceEnd,
    SequenceFailure,
    TokenLogprobs,
    TokenOutput,
    TopCandidate,
    lora_key,
)
from .kv_pool import KvPool
from .prompt_cache import PromptCache, as_tokens, common_prefix

log = logging.getLogger(__name__)

_BACKEND_LOCK = threading.Lock()
_DEFAULT_SEED = 0xFFFFFFFF  # LLAMA_DEFAULT_SEED: a random seed
PREFILL_CHUNK = 256  # prompt tokens per step while other sequences are decoding
N_BATCH = 512
_MIN_GAIN = 4  # prompt tokens a state copy must save to be worth it
_MIN_CACHED = 8  # shorter sequences are not worth a place in the host prompt cache
DET_CHUNK = 32
"""Deterministic mode: most prompt tokens of one sequence per ``llama_decode`` (under 64: one path)."""
_MAX_SEQ = 256  # LLAMA_MAX_SEQ of this llama.cpp
_GGML_KV_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                  "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def _init_backend() -> None:
    with _BACKEND_LOCK:
        # llama-cpp-python installs a stderr logger at import; keep llama.cpp quiet unless debugging.
        from llama_cpp import _logger

        _logger.set_verbose(log.isEnabledFor(logging.DEBUG))
        llama_cpp.llama_backend_init()


def kv_geometry(path: Path) -> tuple[int, int]:
    """(KV cache bytes one token takes in every layer at f16, training context) of a GGUF file,
    from its metadata, read by a vocab-only load (no weights are read)."""
    _init_backend()
    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    if not model:
        raise ModelLoadError("the model file could not be loaded (corrupt, truncated or unsupported)")
    try:
        return _model_kv_geometry(model)
    finally:
        llama_cpp.llama_model_free(model)


def _model_kv_geometry(model: Any) -> tuple[int, int]:
    """(f16 KV bytes per token, all layers; training context) from a loaded model's metadata."""
    arch = _meta(model, "general.architecture") or ""

    def meta_int(key: str, default: int) -> int:
        value = _meta(model, f"{arch}.{key}")
        return int(value) if value and value.isdigit() else default

    n_layer = meta_int("block_count", 0)
    n_embd = meta_int("embedding_length", 0)
    n_head = max(1, meta_int("attention.head_count", 1))
    n_head_kv = meta_int("attention.head_count_kv", n_head)
    k_len = meta_int("attention.key_length", n_embd // n_head)
    v_len = meta_int("attention.value_length", n_embd // n_head)
    n_ctx_train = meta_int("context_length", LLAMA_CPP.default_context)
    return n_layer * n_head_kv * (k_len + v_len) * 2, n_ctx_train


def _meta(model: Any, key: str) -> str | None:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


@dataclass
class LlamaCppOptions:
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    n_ctx: int | None = None
    """Longest request. None: the model's training context (capped by the pool; per-slot streams:
    at the backend's default)."""
    max_batch: int = 4
    n_gpu_layers: int = 0
    flash_attn: bool = True
    prompt_cache_bytes: int | None = None
    """Host memory for the KV state of finished sequences (0: off; None: derived, see
    :func:`~.backends.plan_kv`: none with the pool, 1/8 of the KV cache with per-slot streams)."""
    deterministic: bool = False
    """Same tokens for the same request whatever else runs or is cached (see the module doc).
    Uses one KV stream per slot instead of the shared pool."""
    kv_tokens: int | None = None
    """Cells of the shared KV pool (None: :func:`~.backends.default_kv_tokens`)."""
    kv_cache_type: str = "f16"
    """f16, q8_0 or q4_0 (llama.cpp's -ctk/-ctv; quantized V needs flash attention)."""
    memory_budget: int | None = None
    """Bounds the default pool (1/8 of it at most)."""
    max_loras: int = 4
    """LoRA adapters kept loaded when idle (least recently used ones are freed beyond it)."""


@dataclass
class _Lora:
    """A LoRA adapter loaded into the model (llama.cpp's ``llama_adapter_lora``)."""

    name: str
    ptr: Any
    users: int = 0
    """Sequences running with it (it is never freed while any is)."""
    last_used: float = field(default_factory=time.monotonic)
    retired: bool = False
    """Unloaded while in use: freed when its last sequence ends."""


class LlamaCppEngine:
    """A GGUF model loaded with llama.cpp."""

    def __init__(self, path: Path, options: LlamaCppOptions | None = None) -> None:
        _init_backend()
        self.options = opts = options or LlamaCppOptions()
        self.path = path
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = opts.n_gpu_layers
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError("the model file could not be loaded (corrupt, truncated or unsupported)")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.kv_plan = self._plan_kv(model, n_ctx_train)
        n_ctx = self.kv_plan.n_ctx
        gpu = opts.n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        if gpu and opts.deterministic:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError("deterministic mode runs llama.cpp on the CPU only (GPU kernels "
                                 "depend on the batch size); use the CPU or turn the mode off")
        self.metadata = self._read_metadata()
        self._template = self._read_template()
        self.info = EngineInfo(
            engine="llama.cpp",
            model_path=path,
            device="gpu" if gpu else "cpu",
            execution_provider="cuda" if gpu else "cpu",
            n_ctx=n_ctx,
            n_ctx_train=n_ctx_train,
            n_vocab=self.n_vocab,
            max_batch=opts.max_batch,
            capabilities=replace(LLAMA_CPP.capabilities,
                                 embeddings=not llama_cpp.llama_model_has_encoder(model)),
            has_chat_template=self._template is not None,
            n_threads=opts.n_threads,
            n_embd=llama_cpp.llama_model_n_embd(model),
        )
        self._closed = False
        self._pieces: dict[int, bytes] = {}
        self._eog = {t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        self._embed_lock = threading.Lock()
        self._embed_ctx: Any = None
        self._lora_lock = threading.Lock()
        self._loras: OrderedDict[str, _Lora] = OrderedDict()
        """sha256 of the adapter file -> the loaded adapter, least recently used first."""
        self._orphans: list[_Lora] = []
        """Retired adapters still in use, replaced in ``_loras`` by a fresh copy."""
        self._embed_n_ctx = 0

    def _plan_kv(self, model: Any, n_ctx_train: int) -> KvPlan:
        """The KV layout (the same :func:`plan_kv` as the memory estimate): the shared pool, or
        per-slot streams in deterministic mode and for recurrent models (no cells to share)."""
        opts = self.options
        if opts.kv_cache_type != "f16" and not opts.flash_attn:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError("a quantized KV cache needs flash attention")
        f16_bytes, _ = _model_kv_geometry(model)
        recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        options = EngineOptions(n_threads=opts.n_threads, max_batch=opts.max_batch, n_ctx=opts.n_ctx,
                                prompt_cache_bytes=opts.prompt_cache_bytes,
                                deterministic=opts.deterministic, kv_tokens=opts.kv_tokens,
                                kv_cache_type=opts.kv_cache_type, memory_budget=opts.memory_budget)
        try:
            return plan_kv(options, f16_bytes, n_ctx_train,
                           pooled=not opts.deterministic and not recurrent)
        except ModelLoadError:
            llama_cpp.llama_model_free(model)
            raise

    # --- metadata ---------------------------------------------------------------------------

    def _read_metadata(self) -> dict[str, str]:
        out: dict[str, str] = {}
        n = llama_cpp.llama_model_meta_count(self._model)
        buf = ctypes.create_string_buffer(4096)
        for i in range(n):
            if llama_cpp.llama_model_meta_key_by_index(self._model, i, buf, len(buf)) < 0:
                continue
            key = buf.value.decode("utf-8", errors="replace")
            size = llama_cpp.llama_model_meta_val_str_by_index(self._model, i, None, 0)
            if size < 0 or size > 1 << 20:
                continue
            vbuf = ctypes.create_string_buffer(size + 1)
            llama_cpp.llama_model_meta_val_str_by_index(self._model, i, vbuf, size + 1)
            out[key] = vbuf.value.decode("utf-8", errors="replace")
        return out

    def _token_text(self, token: int) -> str:
        if token < 0 or token >= self.n_vocab:
            return ""
        return llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    def _read_template(self) -> ChatTemplateSpec | None:
        source = self.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        return ChatTemplateSpec(
            source=source,
            bos_token=self._token_text(llama_cpp.llama_vocab_bos(self._vocab)),
            eos_token=self._token_text(llama_cpp.llama_vocab_eos(self._vocab)),
        )

    # --- Engine protocol --------------------------------------------------------------------

    def chat_template(self) -> ChatTemplateSpec | None:
        return self._template

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, True)
        if n < 0:
            raise EngineError("tokenization failed")
        return list(buf[:n])

    def token_piece(self, token: int) -> bytes:
        """The token's bytes (cached: this runs once per generated token)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[: max(n, 0)]
        return piece

    def detokenize(self, tokens: Sequence[int]) -> bytes:
        return b"".join(self.token_piece(t) for t in tokens)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def validate_constraint(self, constraint: Constraint) -> None:
        grammar = constraint_to_gbnf(constraint)
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            raise InvalidRequestError("the response schema could not be compiled to a grammar",
                                      param="response_format")
        llama_cpp.llama_sampler_free(sampler)

    def create_runner(self) -> _LlamaRunner:
        return _LlamaRunner(self)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised embeddings from a second, embeddings-only context.

        The context is created on first use and shares the model's weights; calls are serialised
        (it holds one sequence), and run beside the decode loop rather than inside it. It is
        sized for the longest input seen so far (a power of two, at least 512 tokens), not the
        model's context: it costs nothing until used, and little for short inputs.
        """
        longest = max((len(toks) for toks in inputs), default=1)
        if longest > self.info.n_ctx:  # the caller validated them
            raise EngineError("an embedding input is longer than the context")
        n_ctx = min(self.info.n_ctx, max(512, 1 << (longest - 1).bit_length()))
        with self._embed_lock:
            if self._embed_ctx is not None and self._embed_n_ctx < longest:
                llama_cpp.llama_free(self._embed_ctx)
                self._embed_ctx = None
            if self._embed_ctx is None:
                self._embed_n_ctx = n_ctx
                cparams = llama_cpp.llama_context_default_params()
                cparams.n_ctx = n_ctx
                cparams.n_batch = n_ctx
                cparams.n_ubatch = n_ctx
                cparams.n_seq_max = 1
                cparams.n_threads = self.options.n_threads
                cparams.n_threads_batch = self.options.n_threads
                cparams.embeddings = True
                cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
                cparams.no_perf = True
                ctx = llama_cpp.llama_init_from_model(self._model, cparams)
                if not ctx:
                    raise EngineError("could not create an embeddings context")
                self._embed_ctx = ctx
            ctx = self._embed_ctx
            mem = llama_cpp.llama_get_memory(ctx)
            batch = llama_cpp.llama_batch_init(longest, 0, 1)
            out: list[list[float]] = []
            try:
                for toks in inputs:
                    llama_cpp.llama_memory_clear(mem, True)
                    for i, tok in enumerate(toks):
                        batch.token[i] = tok
                        batch.pos[i] = i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = True
                    batch.n_tokens = len(toks)
                    if llama_cpp.llama_decode(ctx, batch) != 0:
                        raise EngineError("the engine could not compute the embedding")
                    ptr = llama_cpp.llama_get_embeddings_seq(ctx, 0)
                    vec = np.ctypeslib.as_array(ptr, shape=(self.info.n_embd or 0,)).astype(np.float64)
                    norm = float(np.linalg.norm(vec)) or 1.0
                    out.append((vec / norm).tolist())
            finally:
                llama_cpp.llama_batch_free(batch)
            return out

    # --- LoRA adapters ----------------------------------------------------------------------
    # An adapter is loaded on the first sequence that uses it and held while any does. The
    # runner takes an adapter off its context before the adapter's last user is released, so an
    # adapter with no users is on no context and may be freed from any thread.

    def acquire_loras(self, refs: LoraSet) -> list[Any]:
        """The adapters' handles, loaded on first use; each is held until :meth:`release_loras`."""
        taken: list[str] = []
        out: list[Any] = []
        with self._lora_lock:
            try:
                for ref in refs:
                    entry = self._loras.get(ref.sha256)
                    if entry is None or entry.retired:
                        if entry is not None:  # retired and in use: a fresh copy for new users
                            self._loras.pop(ref.sha256)
                            self._orphans.append(entry)
                        ptr = llama_cpp.llama_adapter_lora_init(self._model, str(ref.path).encode())
                        if not ptr:
                            raise InvalidRequestError(
                                f"the LoRA adapter '{ref.name}' could not be loaded by llama.cpp for "
                                "this model", param="model")
                        entry = self._loras[ref.sha256] = _Lora(ref.name, ptr)
                    entry.users += 1
                    entry.last_used = time.monotonic()
                    self._loras.move_to_end(ref.sha256)
                    taken.append(ref.sha256)
                    out.append(entry.ptr)
            except BaseException:
                for key in taken:
                    self._loras[key].users -= 1
                raise
            self._trim_loras()
        return out

    def release_loras(self, refs: LoraSet, ptrs: Sequence[Any]) -> None:
        with self._lora_lock:
            now = time.monotonic()
            for ref, ptr in zip(refs, ptrs, strict=False):
                entry = self._loras.get(ref.sha256)
                if entry is None or entry.ptr is not ptr:
                    entry = next((o for o in self._orphans if o.ptr is ptr), None)
                if entry is None:
                    continue
                entry.users -= 1
                entry.last_used = now
                if entry.users <= 0 and entry.retired:
                    self._free_lora(entry)
            self._trim_loras()

    def preload_lora(self, ref: LoraRef) -> None:
        refs = (ref,)
        self.release_loras(refs, self.acquire_loras(refs))

    def loaded_loras(self) -> list[str]:
        with self._lora_lock:
            return sorted({e.name for e in self._loras.values() if not e.retired})

    def unload_lora(self, name: str) -> int:
        with self._lora_lock:
            hits = [e for e in self._loras.values() if e.name == name and not e.retired]
            for entry in hits:
                entry.retired = True
                if entry.users <= 0:
                    self._free_lora(entry)
            return len(hits)

    def expire_loras(self, idle_s: float) -> int:
        with self._lora_lock:
            now = time.monotonic()
            idle = [e for e in self._loras.values() if e.users <= 0 and now - e.last_used > idle_s]
            for entry in idle:
                self._free_lora(entry)
            return len(idle)

    def _trim_loras(self) -> None:
        """Free least recently used idle adapters beyond ``max_loras`` (lock held)."""
        excess = len(self._loras) - self.options.max_loras
        for entry in [e for e in self._loras.values() if e.users <= 0][:max(0, excess)]:
            self._free_lora(entry)

    def _free_lora(self, entry: _Lora) -> None:
        for key, value in list(self._loras.items()):
            if value is entry:
                del self._loras[key]
        if entry in self._orphans:
            self._orphans.remove(entry)
        llama_cpp.llama_adapter_lora_free(entry.ptr)
        log.debug("freed LoRA adapter %s", entry.name)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._loras.clear()  # llama.cpp frees a model's adapters with the model
            self._orphans.clear()
            if self._embed_ctx is not None:
                llama_cpp.llama_free(self._embed_ctx)
                self._embed_ctx = None
            llama_cpp.llama_model_free(self._model)

    # internal accessors for the runner
    @property
    def model_ptr(self) -> Any:
        return self._model

    @property
    def vocab_ptr(self) -> Any:
        return self._vocab


def _same(a: list[Any], b: list[Any]) -> bool:
    """The same adapter handles (by identity), in the same order."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def constraint_to_gbnf(constraint: Constraint) -> str:
    """Compile an engine-neutral constraint to a llama.cpp GBNF grammar (400 on bad schemas)."""
    if constraint.kind == "json_object" and constraint.schema is None:
        return llama_grammar.JSON_GBNF
    schema = constraint.schema if constraint.schema is not None else {"type": "object"}
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except RecursionError as exc:
        raise InvalidRequestError("the JSON schema nests too deeply", param="response_format") from exc
    except Exception as exc:
        raise InvalidRequestError(
            f"unsupported JSON schema: {type(exc).__name__}: {str(exc)[:200]}", param="response_format"
        ) from exc


# --- the runner: continuous batching on one context --------------------------------------------


@dataclass
class _Slot:
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


class _LlamaRunner:
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
        self._slots = [_Slot(seq_id=i) for i in range(self.max_batch)]
        self._by_request: dict[str, _Slot] = {}
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
            sampler = self._make_sampler(request.sampling)
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
        if self._cache is not None and len(slot.cached) >= _MIN_CACHED:
            self._cache.put(slot.cached, lambda: self._state_of(slot), slot.lora_key)
        self._release_lora(slot)
        self._tick += 1
        slot.last_used = self._tick

    def step(self) -> list[TokenOutput | SequenceFailure | SequenceEnd]:
        batch = self._batch
        batch.n_tokens = 0
        outputs: list[TokenOutput | SequenceFailure | SequenceEnd] = []
        outputs += self._fit_step()
        logit_rows: list[tuple[_Slot, int]] = []  # (slot, batch index with logits)
        in_batch: list[_Slot] = []
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

    def _push(self, slot: _Slot, token: int, logits: bool) -> int:
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
        best: _Slot | None = None
        for s in self._slots:
            runnable = s.request_id is not None and (s.pending is not None or s.prefilling)
            if runnable and (best is None or s.served < best.served):
                best = s
        return best.lora_key if best is not None else ()

    def _use_lora(self, slots: list[_Slot]) -> None:
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

    def _release_lora(self, slot: _Slot) -> None:
        """Release a finished sequence's adapters, first taking them off the context when no
        running sequence uses the context's set (so that an unused adapter is on no context)."""
        if not slot.lora_ptrs:
            return
        if self._ctx_ptrs and not any(_same(s.lora_ptrs, self._ctx_ptrs) for s in self._by_request.values()):
            self._set_lora([], ())
        self.engine.release_loras(slot.lora, slot.lora_ptrs)
        slot.lora_ptrs = []

    def _reset_slot_cache(self, slot: _Slot) -> None:
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

    def _own_prefix(self, slot: _Slot, keep: int) -> int:
        """``keep`` tokens of ``slot``'s own cache, or 0 when the sliding window before the
        prefix's end is no longer in its sliding-window cache."""
        if keep > 0 and self._n_swa:
            pos_min = llama_cpp.llama_memory_seq_pos_min(self._mem, slot.seq_id)
            if pos_min > max(0, keep - self._n_swa):
                return 0
        return keep

    def _reuse_prefix(self, slot: _Slot, prompt: list[int], want: np.ndarray, shared: dict[int, int]) -> int:
        """Make ``slot``'s cache hold the longest cached prefix of ``prompt`` (``want`` as an
        array; ``shared`` as computed by :meth:`add`); returns its length."""
        if self._pool is not None:
            return self._reuse_in_pool(slot, prompt, want, shared)
        limit = len(prompt) - 1
        keep = self._own_prefix(slot, shared[slot.seq_id])
        state: bytes | None = None
        if self._share:
            # Copying a state costs far less than computing a few tokens: take it from elsewhere
            # when that saves at least _MIN_GAIN of them.
            floor = keep + _MIN_GAIN - 1
            donor: _Slot | None = None
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

    # --- the shared KV pool (module doc: "The shared KV pool") -----------------------------

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
        cparams.type_k = cparams.type_v = _GGML_KV_TYPES[self.engine.options.kv_cache_type]

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

    def _admitted(self, slot: _Slot) -> None:
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
                    "cache_type": self.engine.options.kv_cache_type}
        running = [s.seq_id for s in self._by_request.values()]
        return {"pooled": True, "capacity_tokens": self._pool.n_cells,
                "used_tokens": self._pool.held_by(running),
                "cached_tokens": self._pool.used, "free_tokens": self._pool.free,
                "kept_sequences": len(self._kept),
                "cache_type": self.engine.options.kv_cache_type,
                "preempted": len(self._parked), "preemptions": self.preemptions}

    def _running(self) -> list[_Slot]:
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

    def _keep_finished(self, slot: _Slot) -> None:
        """Keep a finished sequence's cells in the pool under a spare id (``llama_memory_seq_cp``:
        its cells get one more owner), so a later prompt can start from it after the slot moved
        on; an entry it extends is dropped, and the least recently used one makes room."""
        if self._pool is None or not self._n_kept or len(slot.cached) < _MIN_CACHED:
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

    def _drop_cells(self, slot: _Slot, keep: int) -> int:
        """``slot`` keeps its first ``keep`` cached tokens; returns the pool cells freed."""
        assert self._pool is not None
        if keep < len(slot.cached) or self._pool.length(slot.seq_id) > keep:
            llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep if keep > 0 else -1, -1)
        del slot.cached[keep:]
        return self._pool.truncate(slot.seq_id, keep)

    def _preempt(self, slot: _Slot) -> None:
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

    def _reuse_in_pool(self, slot: _Slot, prompt: list[int], want: np.ndarray, shared: dict[int, int]) -> int:
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
        found = (self._cache.lookup(want, keep + _MIN_GAIN - 1, slot.lora_key)
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

    def _state_of(self, slot: _Slot) -> bytes:
        """A copy of ``slot``'s KV entries (all layers), as llama.cpp serialises a sequence."""
        size = llama_cpp.llama_state_seq_get_size(self._ctx, slot.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self._ctx, buf, size, slot.seq_id)
        return bytes(buf)[:n]

    def _pick_slot(self, shared: dict[int, int]) -> _Slot:
        """The free slot whose cache holds most of the prompt; the least recently used on ties."""
        free = [s for s in self._slots if s.request_id is None]
        if not free:
            raise EngineError("no free sequence slot")
        return max(free, key=lambda s: (shared[s.seq_id], -s.last_used))

    def _make_sampler(self, sp: SamplingParams) -> Any:
        params = llama_cpp.llama_sampler_chain_default_params()
        chain = llama_cpp.llama_sampler_chain_init(params)
        add = llama_cpp.llama_sampler_chain_add
        if sp.logit_bias:
            arr = (llama_cpp.llama_logit_bias * len(sp.logit_bias))()
            for i, (tok, bias) in enumerate(sp.logit_bias.items()):
                arr[i].token = tok  # type: ignore[assignment]
                arr[i].bias = bias
            add(chain, llama_cpp.llama_sampler_init_logit_bias(self._n_vocab, len(sp.logit_bias), arr))
        if sp.repeat_penalty != 1.0 or sp.frequency_penalty or sp.presence_penalty:
            add(chain, llama_cpp.llama_sampler_init_penalties(
                self._n_vocab, 64, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty))
        if sp.constraint is not None:
            grammar = constraint_to_gbnf(sp.constraint)
            g = llama_cpp.llama_sampler_init_grammar(self.engine.vocab_ptr, grammar.encode(), b"root")
            if not g:
                llama_cpp.llama_sampler_free(chain)
                raise InvalidRequestError(
                    "the response schema could not be compiled", param="response_format"
                )
            add(chain, g)
        if sp.temperature <= 0.0:
            add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if sp.top_k > 0:
            add(chain, llama_cpp.llama_sampler_init_top_k(sp.top_k))
        if sp.top_p < 1.0:
            add(chain, llama_cpp.llama_sampler_init_top_p(sp.top_p, 1))
        if sp.min_p > 0.0:
            add(chain, llama_cpp.llama_sampler_init_min_p(sp.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(sp.temperature))
        seed = _DEFAULT_SEED if sp.seed is None else sp.seed % 0xFFFFFFFF
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def _sample(self, slot: _Slot, idx: int) -> TokenOutput:
        request_id = slot.request_id or ""
        logprobs = self._logprobs(idx, slot.top_logprobs) if slot.top_logprobs is not None else None
        if slot.greedy:
            # The same choice as llama.cpp's greedy sampler, without copying the whole vocabulary
            # into a candidates array first (~0.1 ms a token at 49k entries).
            ptr = llama_cpp.llama_get_logits_ith(self._ctx, idx)
            token = int(np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).argmax())
        else:
            token = llama_cpp.llama_sampler_sample(slot.sampler, self._ctx, idx)
        if logprobs is not None:
            logprobs = logprobs(token)
        if self.engine.is_eog(token):
            return TokenOutput(request_id, token, b"", end_of_generation=True, logprobs=logprobs)
        slot.pending = token
        return TokenOutput(request_id, token, self.engine.token_piece(token), logprobs=logprobs)

    def _logprobs(self, idx: int, k: int) -> Any:
        ptr = llama_cpp.llama_get_logits_ith(self._ctx, idx)
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,)).astype(np.float64)
        m = logits.max()
        logp = logits - (m + np.log(np.exp(logits - m).sum()))
        top: tuple[TopCandidate, ...] = ()
        if k > 0:
            ids = np.argpartition(-logp, k)[:k]
            ids = ids[np.argsort(-logp[ids])]
            top = tuple(TopCandidate(int(t), self.engine.token_piece(int(t)), float(logp[t])) for t in ids)

        def for_token(token: int) -> TokenLogprobs:
            return TokenLogprobs(float(logp[token]), top)

        return for_token

