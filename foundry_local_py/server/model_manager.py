"""Loaded models: one owner for every load and eviction decision.

A request names a model by alias (``smollm2-135m``) or variant id. The manager resolves it through
the catalog, picks a variant for this machine (off the event loop: probes may run ``nvidia-smi``),
finds its files in the cache, and loads the engine in a worker thread with its scheduler.
Concurrent requests for a model that is loading wait for the same load.

Capacity (``max_loaded_models`` and the memory budget) is decided by one owner, as Ollama's
scheduler does: every decision to admit a load or evict a model happens under one lock, and a load
in progress holds a *reservation* counted like a loaded model, so two concurrent loads cannot both
pass the check. A model's memory is its backend's estimate: weights + the KV cache (llama.cpp: the
shared pool of ``kv_tokens`` at the cache type's bytes per token; per-slot streams: slots x
context) + the host prompt cache's bound. When a load does not fit, the least recently used idle
model is unloaded; when every loaded model is busy, the load waits (up to ``queue_timeout_s``,
then 503) for one to go idle. A lone model that exceeds the budget by itself still loads (there
is nothing to evict).

Models idle longer than their TTL are unloaded by a reaper task that survives any exception
(logged and counted in ``foundry_local_internal_errors_total``); the same task frees LoRA
adapters idle longer than ``lora_ttl_s``.

LoRA adapters (``cache/adapters.py``): ``ALIAS:ADAPTER`` names a registered adapter of ``ALIAS``;
it resolves to the base variant the adapter was registered against (loaded as any model is) plus
the adapter (:class:`AdapterModel`). ``ALIAS:N`` with a number stays a Foundry version. The engine
loads an adapter on its first request and frees idle ones beyond ``max_loras``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import anyio
import psutil

from ..cache.adapters import AdapterNotFoundError, AdapterRecord, AdapterStore, check_name
from ..cache.catalog import Catalog, CatalogModel, Variant
from ..cache.hub import ensure_hub_model, is_hub_name
from ..cache.store import ModelStore
from ..config import Settings, auto_parallel
from ..engines.backends import EngineOptions, MemoryEstimate, backend_for, load_engine, size_on_disk
from ..engines.base import ChatTemplateSpec, Engine, ServesLora
from ..engines.chat_format import ChatFormatter
from ..engines.probe import probe_model
from ..errors import (
    ConflictError,
    FoundryError,
    ModelLoadError,
    ModelNotFoundError,
    ServiceUnavailableError,
)
from ..hardware import (
    HardwareInventory,
    VariantChoice,
    cached_variant_ids,
    choose_for_cache,
    normalize_ep,
    refresh_memory,
)
from ..scheduler.scheduler import Scheduler
from .metrics import Metrics, ModelState

log = logging.getLogger(__name__)

ROOM_POLL_S = 0.1
"""How often a load waiting for room looks again (models go idle without telling the manager)."""
_HOLD_TRIES = 3
DRAIN_TIMEOUT_S = 60.0
"""How long an unload lets running requests finish before ending them."""


@dataclass
class LoadedModel:
    model: CatalogModel
    variant: Variant
    engine: Engine
    scheduler: Scheduler
    formatter: ChatFormatter | None
    ttl_s: float | None
    """Idle time before unloading; None: kept until unloaded explicitly."""
    memory: MemoryEstimate
    engine_ep: str = "cpu"
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    adapter_store: AdapterStore | None = None
    holds: int = 0
    """Requests using the model outside its scheduler (resolved and not yet queued, or counting
    tokens, or embedding): it is busy, so neither eviction nor the idle reaper closes it."""
    released: asyncio.Event | None = field(default=None, repr=False)
    """Set when the last hold ends, for an unload waiting on them."""

    @property
    def alias(self) -> str:
        return self.model.alias

    @property
    def id(self) -> str:
        return self.variant.id

    @property
    def adapter(self) -> AdapterRecord | None:
        return None

    def adapters(self) -> list[AdapterRecord]:
        """Adapters registered against this variant (a request's ``lora`` ids index this list)."""
        if self.adapter_store is None or not self.engine.info.capabilities.lora_adapters:
            return []
        return self.adapter_store.list(base=self.id)

    def loaded_adapters(self) -> list[str]:
        return self.engine.loaded_loras() if isinstance(self.engine, ServesLora) else []

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def base(self) -> LoadedModel:
        """The loaded model serving this name: itself (an :class:`AdapterModel`'s is its base)."""
        return self

    def busy(self) -> bool:
        if self.holds:
            return True
        stats = self.scheduler.stats()
        return stats.running + stats.waiting > 0


@dataclass
class AdapterModel:
    """A base model served with a LoRA adapter (what ``ALIAS:ADAPTER`` resolves to)."""

    base: LoadedModel
    adapter: AdapterRecord

    @property
    def alias(self) -> str:
        return self.base.alias

    @property
    def id(self) -> str:
        return self.base.id

    @property
    def engine(self) -> Engine:
        return self.base.engine

    @property
    def formatter(self) -> ChatFormatter | None:
        return self.base.formatter

    @property
    def scheduler(self) -> Scheduler:
        return self.base.scheduler

    def adapters(self) -> list[AdapterRecord]:
        return self.base.adapters()

    def touch(self) -> None:
        self.base.touch()


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: ModelStore,
        metrics: Metrics,
        inventory: HardwareInventory,
        *,
        engine_loader: Callable[[str, Path, EngineOptions], Engine] = load_engine,
    ) -> None:
        self.settings = settings
        self.inventory = inventory
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self._engine_loader = engine_loader
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._reserved: dict[str, int] = {}
        """Variant id -> bytes, for loads admitted but not finished (counted like loaded models)."""
        self._owner = asyncio.Lock()
        """Held for every admission and eviction decision (never while an engine loads)."""
        self._reaper: asyncio.Task[None] | None = None
        self.adapters = AdapterStore(settings.cache_dir, catalog)

    # --- queries ----------------------------------------------------------------------------

    @property
    def loading(self) -> list[str]:
        return list(self._loading)

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    def find_loaded(self, name: str) -> LoadedModel | None:
        key = name.strip().lower()
        for lm in self._loaded.values():
            if key in (lm.id.lower(), lm.variant.name.lower(), lm.alias.lower()):
                return lm
        return None

    def states(self) -> Iterable[ModelState]:
        for lm in list(self._loaded.values()):
            stats = lm.scheduler.stats()
            lora = isinstance(lm.engine, ServesLora) and lm.engine.info.capabilities.lora_adapters
            running, waiting = lm.scheduler.lora_names() if lora else ((), ())
            yield ModelState(lm.alias, lm.engine.info.engine, lm.engine.info.device, stats.running,
                             stats.waiting, lm.scheduler.max_queue, stats.max_batch, stats.kv_usage,
                             len(lm.loaded_adapters()), running, waiting,
                             self.settings.max_loras if lora else 0, stats.kv_tokens)

    def memory_budget(self) -> int:
        return self.settings.memory_budget_bytes or int(psutil.virtual_memory().total * 0.75)

    def choose(
        self, model: CatalogModel, *, ep: str | None = None, requested: str | None = None,
        exclude: Collection[str] = frozenset(),
    ) -> VariantChoice:
        """The variant this machine runs for ``model``, among those already in the cache.
        Blocking (probes GPU memory): call it off the event loop."""
        cached = cached_variant_ids(model, self.store)
        if not cached:
            raise ModelNotFoundError(
                model.alias,
                detail=f"No variant is in the cache; run 'foundry-local model download {model.alias}'.",
            )
        uncached = {v.id for v in model.variants} - cached
        if requested is not None and requested in uncached:
            raise ModelNotFoundError(
                requested, detail=f"It is not in the cache; run 'foundry-local model download {requested}'.")
        # Choose among the cached variants only. (Passing the others as ``exclude`` made them look
        # like load failures: a request for an unusable ``ep`` got a 500 "left to try after load
        # failures" instead of a 400 on ``ep``.)
        in_cache = model.model_copy(update={"variants": [v for v in model.variants if v.id in cached]})
        choice = choose_for_cache(
            in_cache, refresh_memory(self.inventory), self.store, cached=cached,
            device=self.settings.device, ep=ep or self.settings.ep, requested=requested,
            exclude=exclude,
        )
        choice.require()
        return choice

    # --- loading ----------------------------------------------------------------------------

    def find_adapter(self, name: str) -> AdapterRecord | None:
        """The adapter ``ALIAS:ADAPTER`` names (404 when ALIAS has no such adapter); None when
        ``name`` names no adapter (a plain alias, a variant id, ``ALIAS:N`` version, a hub name)."""
        head, sep, tail = name.strip().rpartition(":")
        if not sep or not head or tail.isdigit() or is_hub_name(name):
            return None
        check_name(tail, param="model")  # 400 for a name that could never be registered
        try:
            record = self.adapters.get(tail)
        except AdapterNotFoundError:
            raise AdapterNotFoundError(f"model '{head}' has no adapter named '{tail}'",
                                       param="model") from None
        ok = head.lower() in {record.base.lower(), record.base_variant.lower(),
                              record.base_variant.split(":")[0].lower()}
        if not ok:
            try:
                ok = self.catalog.lookup(head)[0].alias.lower() == record.base.lower()
            except FoundryError:
                ok = False
        if not ok:
            raise AdapterNotFoundError(f"model '{head}' has no adapter named '{tail}' (it is an adapter "
                                       f"of '{record.base}')", param="model")
        return record

    async def get(
        self, name: str, *, ep: str | None = None, ttl: float | None = None
    ) -> LoadedModel | AdapterModel:
        """The loaded model for ``name``, loading it on demand (404 for unknown names); for
        ``ALIAS:ADAPTER`` the adapter's base variant with the adapter."""
        adapter = self.find_adapter(name)
        if adapter is not None:
            return AdapterModel(await self.get_model(adapter.base_variant, ep=ep, ttl=ttl), adapter)
        return await self.get_model(name, ep=ep, ttl=ttl)

    @contextlib.asynccontextmanager
    async def hold(
        self, name: str, *, ep: str | None = None, ttl: float | None = None
    ) -> AsyncIterator[LoadedModel | AdapterModel]:
        """:meth:`get`, and the model stays loaded until the block ends (Ollama's reference count
        on a runner): a load of another model waits for it rather than closing the engine while
        the request tokenizes, validates or queues. Once a request is in the model's scheduler,
        the scheduler's own count keeps the model busy."""
        for _ in range(_HOLD_TRIES):
            served = await self.get(name, ep=ep, ttl=ttl)
            base = served.base
            # No await since get() returned: the model is still loaded, unless another task
            # evicted it while this one waited on a load; then it is resolved again.
            if self._loaded.get(base.id) is base:
                break
        else:
            raise ServiceUnavailableError(f"model '{name}' was unloaded while being resolved; retry")
        base.holds += 1
        try:
            yield served
        finally:
            base.holds -= 1
            base.touch()
            if not base.holds and base.released is not None:
                base.released.set()

    async def get_model(self, name: str, *, ep: str | None = None, ttl: float | None = None) -> LoadedModel:
        """The loaded model for ``name`` (an alias or variant id), loading it on demand."""
        lm = self.find_loaded(name)
        if lm is not None and (ep is None or normalize_ep(ep) in (None, lm.engine_ep)):
            self._set_ttl(lm, ttl)
            lm.touch()
            return lm
        return await self.load(name, ep=ep, ttl=ttl)

    async def load(
        self, name: str, *, ep: str | None = None, ttl: float | None = None, pinned: bool = False
    ) -> LoadedModel:
        if is_hub_name(name):
            # hf.co/...: known once downloaded (from the user catalog, off the loop). A request never
            # reaches the hub: a client could otherwise make the server list any repo and grow the
            # user catalog; /openai/download (or the CLI) resolves and downloads new names.
            model, fixed = await asyncio.to_thread(ensure_hub_model, self.store.root, self.catalog, name,
                                                   network=False)
        else:
            model, fixed = self.catalog.lookup(name)
        requested = fixed.id if fixed else None
        choice = await anyio.to_thread.run_sync(
            lambda: self.choose(model, ep=ep, requested=requested))
        variant = choice.require()
        if variant.id in self._loaded:
            lm = self._loaded[variant.id]
            self._set_ttl(lm, ttl)
            lm.touch()
            return lm
        future = self._loading.get(variant.id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._loading[variant.id] = future
            try:
                default_ttl = None if pinned else (self.settings.model_ttl_s or None)
                lm = await self._load_new(model, choice, ttl if ttl is not None else default_ttl,
                                          allow_fallback=fixed is None, ep=ep)
                future.set_result(lm)
            except BaseException as exc:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters re-raise it themselves
                raise
            finally:
                self._loading.pop(variant.id, None)
            return lm
        lm = await asyncio.shield(future)
        self._set_ttl(lm, ttl)
        return lm

    @staticmethod
    def _set_ttl(lm: LoadedModel, ttl: float | None) -> None:
        """A load that names a TTL sets it on a model that is already loaded (0: keep it loaded)."""
        if ttl is not None:
            lm.ttl_s = ttl or None

    def _options(self, model: CatalogModel, variant: Variant, engine_ep: str) -> EngineOptions:
        s = self.settings
        backend = backend_for(variant.format)
        pooled = backend.capabilities.kv_pool and not s.deterministic
        model_ctx = variant.context_length or model.context_length
        # A shared pool: a request may use the model's context (the engine caps it by the pool);
        # per-slot streams: each slot holds n_ctx, so the default stays small.
        n_ctx = s.n_ctx or (model_ctx if pooled else min(model_ctx, backend.default_context))
        cache = None if s.prompt_cache_mib is None else s.prompt_cache_mib << 20
        return EngineOptions(n_threads=s.n_threads,
                             max_batch=s.parallel or auto_parallel(None if pooled else n_ctx),
                             n_ctx=n_ctx, execution_provider=engine_ep,
                             prompt_cache_bytes=cache,
                             deterministic=s.deterministic, kv_tokens=s.kv_tokens,
                             kv_cache_type=s.kv_cache_type, memory_budget=self.memory_budget(),
                             max_loras=s.max_loras,
                             allow_batch_dependent_outputs=s.allow_batch_dependent_outputs)

    async def _load_new(
        self, model: CatalogModel, choice: VariantChoice, ttl: float | None, *, allow_fallback: bool,
        ep: str | None,
    ) -> LoadedModel:
        """Load the chosen variant; if it fails to initialise, fall back to the next choice."""
        failed: set[str] = set()
        while True:
            variant = choice.require()
            engine_ep = choice.engine_ep or "cpu"
            options = self._options(model, variant, engine_ep)
            try:
                path = self.store.resolve(model, variant)
                memory = await anyio.to_thread.run_sync(_estimate, variant, path, options)
                await self._reserve(variant, memory.total)
                try:
                    started = time.monotonic()
                    engine, scheduler, formatter = await anyio.to_thread.run_sync(
                        self._load_sync, model, variant, path, options)
                finally:
                    self._reserved.pop(variant.id, None)
            except ModelLoadError as exc:
                self.metrics.model_load_failures.labels(model.alias).inc()
                failed.add(variant.id)
                if not allow_fallback:
                    raise
                try:
                    choice = await anyio.to_thread.run_sync(
                        lambda: self.choose(model, ep=ep, exclude=failed))
                except FoundryError:
                    raise exc from None
                log.warning("variant %s (%s) failed to load: %s; falling back to %s",
                            variant.id, engine_ep, exc.message, choice.variant_id)
                self.metrics.provider_fallbacks.labels(model.alias, variant.id).inc()
                continue
            lm = LoadedModel(model, variant, engine, scheduler, formatter, ttl, memory, engine_ep,
                             load_seconds=time.monotonic() - started, adapter_store=self.adapters)
            self.metrics.model_load_seconds.labels(model.alias).observe(lm.load_seconds)
            self.metrics.declare_model(model.alias)
            self._loaded[variant.id] = lm
            if variant.format == "onnx" and options.max_batch > 1:
                await anyio.to_thread.run_sync(self._record_batching, model, variant, engine)
            log.info("loaded %s (%s on %s, %s) in %.2fs, ~%d MiB: %s", variant.id, lm.engine.info.engine,
                     lm.engine.info.device, engine_ep, lm.load_seconds, memory.total >> 20, choice.reason)
            return lm

    def _record_batching(self, model: CatalogModel, variant: Variant, engine: Engine) -> None:
        """Keep the engine's batch verdict (``Capabilities.batching``) for ``model info``."""
        caps = engine.info.capabilities
        batching = caps.batching
        self.store.record_batching(model, variant, {
            "batching": batching, "reason": caps.batching_reason, "machine": platform.machine(),
            "allowed_dependent": self.settings.allow_batch_dependent_outputs,
            "measured": datetime.now(UTC).isoformat(timespec="seconds")})

    def _load_sync(
        self, model: CatalogModel, variant: Variant, path: Path, options: EngineOptions,
    ) -> tuple[Engine, Scheduler, ChatFormatter | None]:
        """The engine, its running scheduler and the chat formatter (worker thread)."""
        s = self.settings
        if self._engine_loader is load_engine:  # crash isolation (engines/probe.py); fakes skip it
            probe_model(variant.format, path, s)
        engine = self._engine_loader(variant.format, path, options)
        try:
            spec = engine.chat_template()
            if variant.chat_template:
                spec = ChatTemplateSpec(variant.chat_template, spec.bos_token if spec else "",
                                        spec.eos_token if spec else "")
            formatter = (
                ChatFormatter(spec, timeout_s=s.template_timeout_s)
                if spec is not None and model.chat
                else None
            )
            scheduler = Scheduler(engine, name=model.alias, max_queue=s.max_queue,
                                  queue_timeout_s=s.queue_timeout_s,
                                  on_admit=self.metrics.prefix_cache_observer(model.alias))
            scheduler.start()
        except BaseException:
            engine.close()
            raise
        return engine, scheduler, formatter

    async def _reserve(self, incoming: Variant, need: int) -> None:
        """Admit a load of ``need`` bytes: evict idle models (least recently used first) until it
        fits both bounds, or wait for a busy one to go idle. Holds a reservation on return."""
        deadline = time.monotonic() + self.settings.queue_timeout_s
        while True:
            async with self._owner:
                victim = self._admit_or_pick_victim(incoming, need)
                if victim is None:
                    return
                if victim != "wait":
                    log.info("evicting %s (least recently used) to load %s", victim.id, incoming.id)
                    del self._loaded[victim.id]
            if victim != "wait":
                await anyio.to_thread.run_sync(self._close_sync, victim, True)
                continue
            if time.monotonic() > deadline:
                raise ServiceUnavailableError(
                    f"no room to load model '{incoming.id}': every loaded model is busy "
                    f"(max_loaded_models={self.settings.max_loaded_models})")
            await asyncio.sleep(ROOM_POLL_S)

    def _admit_or_pick_victim(self, incoming: Variant, need: int) -> LoadedModel | Literal["wait"] | None:
        """Under the owner lock: None (reserved: it fits), a model to evict, or "wait" (no room
        now, and every loaded model is busy)."""
        models = self.loaded()
        count = len(models) + len(self._reserved)
        used = sum(m.memory.total for m in models) + sum(self._reserved.values())
        if count == 0 or (count < self.settings.max_loaded_models and used + need <= self.memory_budget()):
            if count == 0 and need > self.memory_budget():
                log.warning("%s needs ~%d MiB, over the memory budget of %d MiB; loading it anyway "
                            "(nothing else is loaded)", incoming.id, need >> 20, self.memory_budget() >> 20)
            self._reserved[incoming.id] = need
            return None
        idle = [m for m in models if not m.busy()]
        if not idle:
            return "wait"
        return min(idle, key=lambda m: m.last_used)

    # --- unloading --------------------------------------------------------------------------

    async def unload(self, name: str, *, force: bool = False) -> LoadedModel:
        lm = self.find_loaded(name)
        if lm is None:
            self.catalog.lookup(name)  # 404 for unknown names
            raise ModelNotFoundError(name, detail="It is not loaded.")
        if lm.busy() and not force:
            raise ConflictError(f"model '{name}' is serving requests; use force to unload it anyway")
        await self._unload(lm, drain=not force)
        return lm

    async def unload_all(self, *, force: bool = True) -> int:
        models = self.loaded()
        for lm in models:
            await self._unload(lm, drain=not force)
        return len(models)

    async def _unload(self, lm: LoadedModel, *, drain: bool = True) -> None:
        async with self._owner:
            if self._loaded.get(lm.id) is not lm:
                return
            del self._loaded[lm.id]
        # Nobody can take a new hold now (holds are taken on loaded models only); the ones taken
        # are short (a tokenization, a validation): the engine closes after them, even when forced.
        if lm.holds:
            lm.released = asyncio.Event()
            try:
                await asyncio.wait_for(lm.released.wait(), self.settings.queue_timeout_s)
            except TimeoutError:
                log.warning("unloading %s with %d requests still holding it", lm.id, lm.holds)
        await anyio.to_thread.run_sync(self._close_sync, lm, drain)

    @staticmethod
    def _close_sync(lm: LoadedModel, drain: bool, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Stop the scheduler, then free the engine, never under a running call: requests still
        running after ``timeout`` of draining are ended (503, as a forced unload does); a worker
        that still does not stop leaves its engine allocated (a leak, logged) rather than have
        llama.cpp free the context it is decoding with (a crash)."""
        lm.scheduler.stop(drain=drain, timeout=timeout)
        if not lm.scheduler.stopped and drain:
            log.warning("%s: requests still running after %.0f s of draining; ending them", lm.id, timeout)
            lm.scheduler.stop(drain=False, timeout=timeout)
        if not lm.scheduler.stopped:
            log.error("%s: its worker did not stop; the engine stays allocated", lm.id)
            return
        lm.engine.close()
        log.info("unloaded %s", lm.id)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.reap_once(time.monotonic())
            except Exception:
                # Whatever went wrong, idle models must keep being unloaded: log, count, go on.
                log.exception("the idle-model reaper failed; it keeps running")
                self.metrics.internal_errors.labels("reaper").inc()

    async def reap_once(self, now: float) -> int:
        """Unload every model idle past its TTL; returns how many were unloaded. Frees adapters
        idle past ``lora_ttl_s``."""
        n = 0
        if self.settings.lora_ttl_s:
            for lm in self.loaded():
                if isinstance(lm.engine, ServesLora):
                    lm.engine.expire_loras(self.settings.lora_ttl_s)
        for lm in self.loaded():
            idle_since = lm.scheduler.idle_since
            if lm.ttl_s is None or idle_since is None or lm.holds:
                continue
            if now - max(idle_since, lm.last_used) > lm.ttl_s:
                await self._unload(lm)
                n += 1
        return n

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for lm in self.loaded():
            await self._unload(lm, drain=True)


def _estimate(variant: Variant, path: Path, options: EngineOptions) -> MemoryEstimate:
    """The backend's estimate; an unreadable header falls back to the size on disk (the load
    itself then says what is wrong with the file)."""
    try:
        return backend_for(variant.format).estimate_memory(path, options)
    except Exception as exc:
        log.debug("memory estimate for %s failed (%s); using its size on disk", variant.id, exc)
        return MemoryEstimate(size_on_disk(path), 0, options.prompt_cache_bytes or 0)

