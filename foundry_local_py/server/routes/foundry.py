"""Foundry Local's management routes (its legacy service surface), for tools that speak it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ...cache.catalog import CatalogModel, Variant
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
            "maxBatch": info.max_batch, "ttl": lm.ttl_s, "running": stats.running,
            "waiting": stats.waiting, "loadSeconds": round(lm.load_seconds, 3),
        })
    return out


@router.get("/openai/status")
async def status(request: Request) -> JSONResponse:
    core = get_core(request)
    return JSONResponse({
        "Endpoints": [core.base_url],
        "ModelDirPath": str(core.settings.cache_dir),
        "PipeName": None,
        "LoadedModels": [lm.id for lm in core.manager.loaded()],
    })


@router.get("/openai/models")
async def cached_models(request: Request) -> JSONResponse:
    core = get_core(request)
    names = [v.id for m in core.catalog.models for v in m.variants if core.store.is_available(m, v)]
    return JSONResponse(names)


@router.get("/openai/loadedmodels")
async def loaded_models(request: Request) -> JSONResponse:
    return JSONResponse(_loaded_json(get_core(request)))


@router.get("/openai/load/{name:path}")
async def load(
    name: str, request: Request, ttl: float | None = Query(None, ge=0), ep: str | None = None
) -> JSONResponse:
    core = get_core(request)
    lm = await core.manager.load(name, ep=ep, ttl=ttl)
    return JSONResponse({"name": lm.id, "alias": lm.alias, "loaded": True,
                         "loadSeconds": round(lm.load_seconds, 3)})


@router.get("/openai/unload/{name:path}")
async def unload(name: str, request: Request, force: bool = False) -> JSONResponse:
    core = get_core(request)
    lm = await core.manager.unload(name, force=force)
    return JSONResponse({"name": lm.id, "alias": lm.alias, "unloaded": True})


@router.get("/openai/unloadall")
async def unload_all(request: Request) -> JSONResponse:
    n = await get_core(request).manager.unload_all()
    return JSONResponse({"unloaded": n})


def foundry_entry(model: CatalogModel, variant: Variant) -> dict[str, Any]:
    """A catalog entry in the shape of Foundry Local's /foundry/list."""
    return {
        "name": variant.id,
        "displayName": model.display_name,
        "modelType": "ONNX" if variant.format == "onnx" else "GGUF",
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
    core = get_core(request)
    return JSONResponse([foundry_entry(m, v) for m in core.catalog.models for v in m.variants])
