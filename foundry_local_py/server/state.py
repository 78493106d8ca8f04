"""The application's objects, built once in the lifespan and kept on ``app.state.core``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from ..cache.catalog import Catalog, load_catalog
from ..cache.inventory import cache_size_bytes
from ..cache.store import ModelStore
from ..config import Settings
from ..engines.base import Engine
from ..generation import Generator
from ..hardware import HardwareInventory, detect_hardware
from .adapters.responses import ResponsesFrontEnd
from .metrics import Metrics
from .model_manager import ModelManager
from .response_store import ResponseStore
from .serving import ServingCore

CACHE_SIZE_TTL_S = 30.0
EngineLoader = Callable[..., Engine]


@dataclass
class Core:
    settings: Settings
    catalog: Catalog
    store: ModelStore
    metrics: Metrics
    manager: ModelManager
    generator: Generator
    serving: ServingCore
    inventory: HardwareInventory
    responses: ResponseStore
    """Stored responses of the Responses API (SQLite in the cache folder)."""
    responses_api: type[ResponsesFrontEnd]
    """The Responses front-end, bound to that store."""
    preload_error: str | None = None
    preloading: bool = False
    base_url: str = field(default="")
    _cache_size: tuple[float, int] | None = None

    def cache_size(self) -> int:
        """Bytes used by the cache; walked at most every 30 s (scrapes come every few seconds)."""
        now = time.monotonic()
        if self._cache_size is None or now - self._cache_size[0] > CACHE_SIZE_TTL_S:
            self._cache_size = (now, cache_size_bytes(self.store))
        return self._cache_size[1]


def build_core(settings: Settings, *, engine_loader: EngineLoader | None = None) -> Core:
    catalog = load_catalog(settings.cache_dir, settings.catalog_path)
    store = ModelStore(settings.cache_dir)
    metrics = Metrics()
    inventory = detect_hardware()
    manager = ModelManager(settings, catalog, store, metrics, inventory,
                           **({"engine_loader": engine_loader} if engine_loader else {}))
    generator = Generator(manager, settings)
    responses = ResponseStore.in_cache(settings.cache_dir, max_stored=settings.responses_max_stored,
                                       max_age_s=settings.responses_max_age_s)
    core = Core(settings, catalog, store, metrics, manager, generator,
                ServingCore(settings, generator, metrics), inventory, responses,
                ResponsesFrontEnd.bind(responses), base_url=f"http://{settings.host}:{settings.port}")
    metrics.attach_state(manager.states, core.cache_size)
    return core


def get_core(request: Request) -> Core:
    core: Core = request.app.state.core
    return core
