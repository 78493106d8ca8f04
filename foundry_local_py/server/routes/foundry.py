"""Foundry Local's management routes (its legacy service surface), for tools that speak it."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ...cache.acquire import ensure_variant
from ...cache.catalog import CatalogModel, Variant
from ...cache.hub import ensure_hub_model
from ...cache.progress import Progress
from ...engines.backends import backend_for
from ...errors import FoundryError, InvalidRequestError
from ...hardware import choose_for_cache, hardware_report, refresh_memory
from ...hardware.report import accelerators
from ..state import Core, get_core

router = APIRouter()


def _loaded_json(core: Core) -> list[dict[str, Any]]:
    out = []
    for lm in core.manager.loaded():
        stats = lm.scheduler.stats()
        info = lm.engine.info
        out.append({
            "name": lm.id, "alias": lm.alias, "engine": info.engine, "device": info.device,
            "executionProvider": info.execution_provider, "contextLength": info.n_ctx,
            "maxBatch": info.max_batch, "batching": info.capabilities.batching,
            "batchingReason": info.capabilities.batching_reason, "ttl": lm.ttl_s,
            "running": stats.running, "waiting": stats.waiting, "loadSeconds": round(lm.load_seconds, 3),
        })
    return out


@router.get("/openai/status")
async def status(request: Request) -> JSONResponse:
    """Foundry Local's service status: its endpoints and the model cache folder."""
    core = get_core(request)
    return JSONResponse({
        "Endpoints": [core.base_url],
        "ModelDirPath": str(core.settings.cache_dir),
        "PipeName": None,
        "LoadedModels": [lm.id for lm in core.manager.loaded()],
        "Hardware": {"accelerators": accelerators(core.inventory), **core.inventory.to_dict()},
    })


@router.get("/openai/models")
async def cached_models(request: Request) -> JSONResponse:
    """Ids of the variants in the cache."""
    core = get_core(request)
    names = [v.id for m in core.catalog.models for v in m.variants if core.store.is_available(m, v)]
    return JSONResponse(names)


@router.get("/openai/loadedmodels")
async def loaded_models(request: Request) -> JSONResponse:
    """Loaded models: engine, device, context, slots, TTL, running and waiting requests."""
    return JSONResponse(_loaded_json(get_core(request)))


@router.get("/openai/load/{name:path}")
async def load(
    name: str, request: Request, ttl: float | None = Query(None, ge=0), ep: str | None = None
) -> JSONResponse:
    """Load a model (alias, variant id or hf.co/<owner>/<repo>[:<quant>]); ttl= and ep= as in Foundry
    Local."""
    core = get_core(request)
    lm = await core.manager.load(name, ep=ep, ttl=ttl)
    return JSONResponse({"name": lm.id, "alias": lm.alias, "loaded": True,
                         "loadSeconds": round(lm.load_seconds, 3)})


@router.get("/openai/unload/{name:path}")
async def unload(name: str, request: Request, force: bool = False) -> JSONResponse:
    """Unload a model; force=true unloads it even while it answers."""
    core = get_core(request)
    lm = await core.manager.unload(name, force=force)
    return JSONResponse({"name": lm.id, "alias": lm.alias, "unloaded": True})


@router.get("/openai/unloadall")
async def unload_all(request: Request) -> JSONResponse:
    """Unload every model."""
    n = await get_core(request).manager.unload_all()
    return JSONResponse({"unloaded": n})


def foundry_entry(model: CatalogModel, variant: Variant) -> dict[str, Any]:
    """A catalog entry in the shape of Foundry Local's /foundry/list."""
    return {
        "name": variant.id,
        "displayName": model.display_name,
        "modelType": backend_for(variant.format).model_type,
        "providerType": "FoundryLocalPy",
        "uri": getattr(variant.source, "repo", None) or variant.source.kind,
        "version": str(variant.version),
        "promptTemplate": None,
        "publisher": model.publisher,
        "task": model.task,
        "runtime": {"deviceType": variant.device.upper(), "executionProvider": variant.execution_provider},
        "fileSizeMb": round((variant.size_bytes or 0) / 2**20),
        "modelSettings": {"parameters": []},
        "alias": model.alias,
        "supportsToolCalling": model.supports_tool_calling,
        "license": model.license,
        "licenseDescription": model.license_description,
        "parentModelUri": None,
        "maxOutputTokens": model.context_length,
        "minFLVersion": None,
    }


@router.get("/foundry/list")
async def catalog_list(request: Request) -> JSONResponse:
    """The catalog, one entry per variant, in Foundry Local's /foundry/list shape."""
    core = get_core(request)
    return JSONResponse([foundry_entry(m, v) for m in core.catalog.models for v in m.variants])


class _ClientGone(Exception):
    """Raised from the progress callback to stop a download whose client left (kept for resume)."""


def _download_target(body: dict[str, Any]) -> str | None:
    """Foundry Local sends {"model": {"Name": ...}}; also accept {"model": "alias"} and {"Name": ...}."""
    model = body.get("model", body)
    if isinstance(model, str):
        return model
    if isinstance(model, dict):
        for key in ("Name", "name", "Alias", "alias"):
            if isinstance(model.get(key), str):
                return str(model[key])
    return None


@router.post("/openai/download")
async def download(request: Request) -> StreamingResponse:
    """Fetch a model into the cache, streaming progress lines, then ``{"Success", "ErrorMessage"}``."""
    core = get_core(request)
    raw = await request.body()
    try:
        body = json.loads(raw) if raw.strip() else None
    except ValueError:
        body = None
    name = _download_target(body) if isinstance(body, dict) else None
    if not name:
        raise InvalidRequestError("the body must name a model: {\"model\": {\"Name\": ...}}", param="model")
    force = bool(body.get("force", False)) if isinstance(body, dict) else False
    token = body.get("token") if isinstance(body, dict) and isinstance(body.get("token"), str) else None
    # hf.co/<owner>/<repo>[:<quant>] names are resolved on the hub (a listing: off the loop).
    model, fixed = await asyncio.to_thread(ensure_hub_model, core.store.root, core.catalog, name, token=token)
    variant = fixed or choose_for_cache(
        model, core.inventory, core.store, device=core.settings.device, ep=core.settings.ep,
        prefer_cached=False,
    ).require()
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Progress | BaseException | None] = asyncio.Queue()
    gone = threading.Event()
    counter = core.metrics.download_bytes.labels(model.alias)

    def report(p: Progress) -> None:
        if gone.is_set():
            raise _ClientGone
        if p.new_bytes:
            counter.inc(p.new_bytes)
        loop.call_soon_threadsafe(queue.put_nowait, p)

    def work() -> None:
        try:
            ensure_variant(core.store, core.catalog, model, variant, progress=report, force=force,
                           token=token)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except BaseException as exc:
            loop.call_soon_threadsafe(queue.put_nowait, exc)

    task = loop.run_in_executor(None, work)

    async def lines() -> AsyncIterator[str]:
        last_pct = -1.0
        try:
            while True:
                item = await queue.get()
                if item is None:
                    yield json.dumps({"Success": True, "ErrorMessage": None}) + "\n"
                    return
                if isinstance(item, BaseException):
                    message = item.message if isinstance(item, FoundryError) else "the download failed"
                    yield json.dumps({"Success": False, "ErrorMessage": message}) + "\n"
                    return
                if item.total_bytes:
                    pct = 100.0 * item.done_bytes / item.total_bytes
                    if pct - last_pct >= 1.0 or item.stage != "download":
                        last_pct = pct
                        yield f"Total {pct:.2f}% {item.stage.capitalize()} {variant.id}\n"
        finally:
            gone.set()
            await asyncio.shield(task)

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


@router.get("/foundry/hardware")
async def hardware(request: Request) -> JSONResponse:
    """Detected hardware and the variant each catalog model would get on it."""
    core = get_core(request)
    report = await anyio.to_thread.run_sync(
        lambda: hardware_report(refresh_memory(core.inventory), core.catalog, core.store,
                                device=core.settings.device, ep=core.settings.ep))
    return JSONResponse(report)
