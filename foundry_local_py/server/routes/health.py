"""/health (readiness) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import get_core

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    core = get_core(request)
    loading = core.manager.loading
    status = "loading" if core.preloading or loading else "ok"
    body = {
        "status": status,
        "loaded": [lm.id for lm in core.manager.loaded()],
        "loading": loading,
    }
    if core.preload_error:
        body["error"] = core.preload_error
    return JSONResponse(body, status_code=503 if core.preloading else 200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    core = get_core(request)
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)
