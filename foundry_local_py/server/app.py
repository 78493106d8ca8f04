"""``create_app(settings)``: the FastAPI application. Everything it owns lives on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from ..config import Settings
from ..errors import FoundryError
from ..protocol.anthropic import CountTokensRequest, MessagesRequest
from ..protocol.chat import ChatCompletionRequest
from ..protocol.completions import CompletionRequest
from ..protocol.embeddings import EmbeddingRequest
from ..protocol.models import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from ..protocol.responses import InputTokensRequest, ResponseCreateRequest
from .errors import install_error_handlers
from .middleware import GuardMiddleware
from .routes import foundry, health, lora, messages, openai, responses
from .state import Core, EngineLoader, build_core
from .transport import Drain

log = logging.getLogger(__name__)


async def _preload(core: Core) -> None:
    name = core.settings.default_model
    try:
        await core.manager.load(name, pinned=True)
    except FoundryError as exc:
        core.preload_error = f"could not load '{name}': {exc.message}"
        log.error("%s", core.preload_error)
    except Exception:
        core.preload_error = f"could not load '{name}'"
        log.exception("preloading %s failed", name)
    finally:
        core.preloading = False


def create_app(settings: Settings | None = None, *, engine_loader: EngineLoader | None = None,
               core: Core | None = None, drain: Drain | None = None) -> FastAPI:
    """The application. ``engine_loader`` replaces the engine factory (tests with fake engines).
    ``core``: serve an existing core (the in-process SDK's ``start_web_service``: its loaded models
    and schedulers are shared with the HTTP API); its owner starts and closes it.
    ``drain`` is the shutdown state the server sets on SIGTERM (server/transport.py)."""
    settings = core.settings if core is not None else (settings or Settings())
    drain = drain or Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if core is not None:
            app.state.core = core
            yield
            return
        core_ = build_core(settings, engine_loader=engine_loader)
        async with _owned(app, core_):
            yield

    @contextlib.asynccontextmanager
    async def _owned(app: FastAPI, owned: Core) -> AsyncIterator[None]:
        app.state.core = owned
        owned.manager.start()
        preload: asyncio.Task[None] | None = None
        if settings.preload and settings.default_model:
            owned.preloading = True
            preload = asyncio.get_running_loop().create_task(_preload(owned))
        try:
            yield
        finally:
            if preload is not None and not preload.done():
                preload.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await preload
            await owned.manager.close()
            owned.responses.close()

    app = FastAPI(
        title="foundry-local-py",
        description="Local OpenAI-compatible inference server",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.drain = drain
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(foundry.router)
    app.include_router(responses.router)
    app.include_router(messages.router)
    app.include_router(lora.router)
    # Body schemas for the docs (the routes parse bodies themselves, whatever the content type).
    app.openapi_schema = None
    _register_schemas(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_credentials="*" not in settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(GuardMiddleware, settings=settings, drain=drain)
    return app


def _register_schemas(app: FastAPI) -> None:
    original = app.openapi

    def openapi() -> dict[str, object]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ResponseCreateRequest,
                      InputTokensRequest, MessagesRequest, CountTokensRequest, LoadLoraAdapterRequest,
                      UnloadLoraAdapterRequest):
            components[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(components[model.__name__].pop("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
