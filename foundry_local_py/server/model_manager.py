"""Loaded models: on-demand loading, per-model schedulers, idle TTL and LRU eviction.

A request names a model by alias (``smollm2-135m``) or variant id. The manager resolves it through
the catalog, picks a variant for this machine, finds its files in the cache, loads the engine in a
worker thread and starts its scheduler. Concurrent requests for a model that is loading wait for
the same load. Models idle longer than their TTL are unloaded; when more than
``max_loaded_models`` (or more than the memory budget) would be loaded, the least recently used
idle model goes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import anyio
import psutil

from ..cache.catalog import Catalog, CatalogModel, Variant
from ..cache.store import ModelStore
from ..config import Settings, auto_parallel
from ..engines.base import Engine
from ..engines.chat_format import ChatFormatter
from ..engines.factory import EngineOptions, load_engine
from ..engines.probe import probe_model
from ..errors import ConflictError, FoundryError, ModelLoadError, ModelNotFoundError
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

DEFAULT_CTX_CAP = 4096
"""Context per sequence unless --n-ctx says otherwise (Ollama's default): the KV cache holds
``max_batch`` of these, so the model's full 8k-32k would cost hundreds of MB per small model."""

@dataclass
class LoadedModel:
    model: CatalogModel
    variant: Variant
    engine: Engine
    scheduler: Scheduler
    formatter: ChatFormatter | None
    ttl_s: float | None
    """Idle time before unloading; None: kept until unloaded explicitly."""
    engine_ep: str = "cpu"
    loaded_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0

    @property
    def alias(self) -> str:
        return self.model.alias

    @property
    def id(self) -> str:
        return self.variant.id

    @property
    def size_bytes(self) -> int:
        return self.variant.size_bytes or 0

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def busy(self) -> bool:
        stats = self.scheduler.stats()
        return stats.running + stats.waiting > 0


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        store: ModelStore,
        metrics: Metrics,
        inventory: HardwareInventory,
        *,
        engine_loader: Callable[..., Engine] = load_engine,
    ) -> None:
        self.settings = settings
        self.inventory = inventory
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self._engine_loader = engine_loader
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self.load_errors: dict[str, str] = {}

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
            yield ModelState(lm.alias, lm.engine.info.engine, lm.engine.info.device, stats.running,
                             stats.waiting)

    def choose(
        self, model: CatalogModel, *, ep: str | None = None, requested: str | None = None,
        exclude: Collection[str] = frozenset(),
    ) -> VariantChoice:
        """The variant this machine runs for ``model``, among those already in the cache."""
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

    async def get(self, name: str, *, ep: str | None = None, ttl: float | None = None) -> LoadedModel:
        """The loaded model for ``name``, loading it on demand (404 for unknown names)."""
        lm = self.find_loaded(name)
        if lm is not None and (ep is None or normalize_ep(ep) in (None, lm.engine_ep)):
            self._set_ttl(lm, ttl)
            lm.touch()
            return lm
        return await self.load(name, ep=ep, ttl=ttl)

    async def load(
        self, name: str, *, ep: str | None = None, ttl: float | None = None, pinned: bool = False
    ) -> LoadedModel:
        model, fixed = self.catalog.lookup(name)
        choice = self.choose(model, ep=ep, requested=fixed.id if fixed else None)
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

    async def _load_new(
        self, model: CatalogModel, choice: VariantChoice, ttl: float | None, *, allow_fallback: bool,
        ep: str | None,
    ) -> LoadedModel:
        """Load the chosen variant; if it fails to initialise, fall back to the next choice."""
        failed: set[str] = set()
        while True:
            variant = choice.require()
            engine_ep = choice.engine_ep or "cpu"
            await self._make_room(variant)
            started = time.monotonic()
            try:
                lm = await anyio.to_thread.run_sync(self._load_sync, model, variant, engine_ep, ttl)
            except ModelLoadError as exc:
                self.load_errors[variant.id] = exc.message
                failed.add(variant.id)
                if not allow_fallback:
                    raise
                try:
                    choice = self.choose(model, ep=ep, exclude=failed)
                except FoundryError:
                    raise exc from None
                log.warning("variant %s (%s) failed to load: %s; falling back to %s",
                            variant.id, engine_ep, exc.message, choice.variant_id)
                self.metrics.provider_fallbacks.labels(model.alias, variant.id).inc()
                continue
            lm.load_seconds = time.monotonic() - started
            self.metrics.model_load_seconds.labels(model.alias).observe(lm.load_seconds)
            self.load_errors.pop(variant.id, None)
            async with self._lock:
                self._loaded[variant.id] = lm
            log.info("loaded %s (%s on %s, %s) in %.2fs: %s", variant.id, lm.engine.info.engine,
                     lm.engine.info.device, engine_ep, lm.load_seconds, choice.reason)
            return lm

    def _load_sync(
        self, model: CatalogModel, variant: Variant, engine_ep: str, ttl: float | None
    ) -> LoadedModel:
        path = self.store.resolve(model, variant)
        s = self.settings
        if self._engine_loader is load_engine:  # crash isolation (engines/probe.py); fakes skip it
            probe_model(variant.format, path, s)
        n_ctx = s.n_ctx or min(variant.context_length or model.context_length, DEFAULT_CTX_CAP)
        engine = self._engine_loader(
            variant.format, path,
            EngineOptions(n_threads=s.n_threads, max_batch=s.parallel or auto_parallel(n_ctx), n_ctx=n_ctx,
                          execution_provider=engine_ep, prompt_cache_bytes=s.prompt_cache_mib << 20),
        )
        try:
            spec = engine.chat_template()
            if variant.chat_template:
                from ..engines.base import ChatTemplateSpec

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
        return LoadedModel(model, variant, engine, scheduler, formatter, ttl, engine_ep)

    async def _make_room(self, incoming: Variant) -> None:
        budget = self.settings.memory_budget_bytes or int(psutil.virtual_memory().total * 0.75)
        while True:
            models = self.loaded()
            used = sum(m.size_bytes for m in models)
            over_count = len(models) >= self.settings.max_loaded_models
            over_mem = used + (incoming.size_bytes or 0) > budget
            if not models or not (over_count or over_mem):
                return
            idle = [m for m in models if not m.busy()]
            if not idle:
                return  # everything is busy: load anyway rather than fail requests
            victim = min(idle, key=lambda m: m.last_used)
            log.info("evicting %s (least recently used)", victim.id)
            await self._unload(victim)

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
        async with self._lock:
            if self._loaded.get(lm.id) is not lm:
                return
            del self._loaded[lm.id]
        await anyio.to_thread.run_sync(self._close_sync, lm, drain)
        log.info("unloaded %s", lm.id)

    @staticmethod
    def _close_sync(lm: LoadedModel, drain: bool) -> None:
        lm.scheduler.stop(drain=drain, timeout=60)
        lm.engine.close()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle())

    async def _reap_idle(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for lm in self.loaded():
                idle_since = lm.scheduler.idle_since
                if lm.ttl_s is None or idle_since is None:
                    continue
                if now - max(idle_since, lm.last_used) > lm.ttl_s:
                    try:
                        await self._unload(lm)
                    except FoundryError:
                        log.exception("unloading idle model %s failed", lm.id)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for lm in self.loaded():
            await self._unload(lm, drain=True)
