"""The application's objects, built once in the lifespan and kept on ``app.state.core``."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from ..cache.catalog import Catalog
from ..cache.store import ModelStore
from ..config import Settings
from .metrics import Metrics
from .model_manager import ModelManager
from .serving import ServingContext
from .serving_chat import ChatServing
from .serving_completions import CompletionServing


@dataclass
class Core:
    settings: Settings
    catalog: Catalog
    store: ModelStore
    metrics: Metrics
    manager: ModelManager
    chat: ChatServing
    completions: CompletionServing
    preload_error: str | None = None
    preloading: bool = False
    base_url: str = field(default="")


def build_core(settings: Settings) -> Core:
    catalog = Catalog.load(settings.cache_dir / "catalog.json", settings.catalog_path)
    store = ModelStore(settings.cache_dir)
    metrics = Metrics()
    manager = ModelManager(settings, catalog, store, metrics)
    ctx = ServingContext(settings, manager, metrics)
    return Core(settings, catalog, store, metrics, manager, ChatServing(ctx), CompletionServing(ctx),
                base_url=f"http://{settings.host}:{settings.port}")


def get_core(request: Request) -> Core:
    core: Core = request.app.state.core
    return core
