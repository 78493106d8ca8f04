"""The loaded GGUF model: metadata, tokenizer, chat template, embeddings and LoRA adapters.

Generation runs in :mod:`.runner` (one context per runner); the KV layout a runner creates is
planned here, at load, by the same :func:`~..backends.plan_kv` as the model manager's memory
estimate.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import numpy as np

from ...errors import EngineError, InvalidRequestError, ModelLoadError
from ..backends import LLAMA_CPP, EngineOptions, KvPlan, plan_kv
from ..base import ChatTemplateSpec, Constraint, EngineInfo, LoraRef, LoraSet
from .sampling import constraint_to_gbnf

if TYPE_CHECKING:
    from .runner import LlamaRunner

log = logging.getLogger(__name__)

_BACKEND_LOCK = threading.Lock()


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
    """Same tokens for the same request whatever else runs or is cached (see the runner module doc).
    Uses one KV stream per slot instead of the shared pool."""
    kv_tokens: int | None = None
    """Cells of the shared KV pool (None: :func:`~.backends.default_kv_tokens`)."""
    kv_cache_type: str = "auto"
    """auto, f16, q8_0, q4_0 or K/V such as q8_0/f16 (llama.cpp's -ctk/-ctv; a quantized V needs
    flash attention): :func:`~..backends.kv_types`."""
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
        f16_bytes, _ = _model_kv_geometry(model)
        recurrent = llama_cpp.llama_model_is_recurrent(model) or llama_cpp.llama_model_is_hybrid(model)
        options = EngineOptions(n_threads=opts.n_threads, max_batch=opts.max_batch, n_ctx=opts.n_ctx,
                                prompt_cache_bytes=opts.prompt_cache_bytes,
                                deterministic=opts.deterministic, kv_tokens=opts.kv_tokens,
                                kv_cache_type=opts.kv_cache_type, memory_budget=opts.memory_budget,
                                execution_provider="cpu" if opts.n_gpu_layers == 0 else "gpu")
        try:
            plan = plan_kv(options, f16_bytes, n_ctx_train,
                           pooled=not opts.deterministic and not recurrent)
            if plan.cache_types[1] != "f16" and not opts.flash_attn:
                raise ModelLoadError("a quantized V cache needs flash attention")
            return plan
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

    def create_runner(self) -> LlamaRunner:
        from .runner import LlamaRunner

        return LlamaRunner(self)

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

