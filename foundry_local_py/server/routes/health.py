"""/health (readiness), /metrics (Prometheus) and /v1/slots (what each loaded model is running)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import get_core

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Readiness: 200 when ready, 503 while the default model loads (or if it failed to)."""
    core = get_core(request)
    loading = core.manager.loading
    drain = getattr(request.app.state, "drain", None)
    draining = drain is not None and drain.draining
    status = "draining" if draining else "loading" if core.preloading or loading else "ok"
    body: dict[str, Any] = {
        "status": status,
        "loaded": [lm.id for lm in core.manager.loaded()],
        "loading": loading,
    }
    if drain is not None and draining:
        body["running"] = drain.active
    if core.preload_error:
        body["error"] = core.preload_error
    return JSONResponse(body, status_code=503 if core.preloading or draining else 200)


@router.get("/v1/slots")
async def slots(request: Request) -> JSONResponse:
    """Per loaded model: its slots (busy with which request, how far along, or idle), its wait
    queue and its KV pool (`kv_cache`: capacity, tokens held by running requests, tokens kept
    for prefix reuse, preemptions), like llama-server's /slots, for humans and scripts."""
    core = get_core(request)
    data: list[dict[str, Any]] = []
    for lm in core.manager.loaded():
        snap = lm.scheduler.slots()
        busy = {s.slot: s for s in snap.running}
        rows: list[dict[str, Any]] = []
        for i in range(max(snap.max_batch, len(busy))):
            s = busy.get(i)
            rows.append({"id": i, "state": "idle"} if s is None else {
                "id": i, "state": "decoding" if s.completion_tokens else "prefill",
                "request_id": s.request_id, "prompt_tokens": s.prompt_tokens,
                "cached_tokens": s.cached_tokens, "completion_tokens": s.completion_tokens,
                "running_s": round(s.running_s, 3),
            })
        data.append({
            "id": lm.id, "model": lm.alias, "engine": lm.engine.info.engine,
            "parallel": snap.max_batch, "batching": lm.engine.info.capabilities.batching,
            "batching_reason": lm.engine.info.capabilities.batching_reason,
            "running": len(snap.running), "waiting": len(snap.waiting),
            "kv_cache": snap.kv, "slots": rows,
            "queue": [{"request_id": rid, "waiting_s": round(w, 3)} for rid, w in snap.waiting],
        })
    return JSONResponse({"object": "list", "data": data})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text format: the metrics in README's table."""
    core = get_core(request)
    return Response(generate_latest(core.metrics.registry), media_type=CONTENT_TYPE_LATEST)
