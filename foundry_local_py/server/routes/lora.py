"""LoRA adapter routes as vLLM has them: ``POST /v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

Load: ``{"lora_name"}`` loads a registered adapter into its base model's engine now (instead of on
its first request). With ``lora_path`` too (a GGUF LoRA file or a PEFT folder on this machine)
it registers the adapter first (the same validation as ``foundry-local adapter register``);
that needs ``allow_runtime_lora_updating`` (vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``), else
403. ``model`` (an extension) names the base; without it, the one loaded model. Unload:
``{"lora_name"}`` frees the adapter from memory (requests using it finish first); an adapter
registered at runtime is also unregistered.
"""

from __future__ import annotations

from pathlib import Path

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...cache.adapters import check_name
from ...engines.base import LoraRef, ServesLora
from ...errors import InvalidRequestError, PermissionDeniedError
from ...protocol.models import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from ..body import parse_body
from ..state import get_core

router = APIRouter()


def _body_schema(model: type) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


@router.post("/v1/load_lora_adapter", openapi_extra=_body_schema(LoadLoraAdapterRequest))
async def load_lora_adapter(request: Request) -> JSONResponse:
    core = get_core(request)
    body = await parse_body(request, LoadLoraAdapterRequest, core.settings)
    name = check_name(body.lora_name, param="lora_name")
    manager = core.manager
    if body.lora_path is not None:
        if not core.settings.allow_runtime_lora_updating:
            raise PermissionDeniedError(
                "loading an adapter from a path is off on this server; register it with "
                "'foundry-local adapter register' or start the server with "
                "--allow-runtime-lora-updating", param="lora_path")
        base = body.model
        if base is None:
            loaded = manager.loaded()
            if len(loaded) != 1:
                raise InvalidRequestError("name the base model with 'model' (none or several are loaded)",
                                          param="model")
            base = loaded[0].alias
        path = Path(body.lora_path)
        if not path.is_absolute():
            raise InvalidRequestError("lora_path must be an absolute path", param="lora_path")
        record = await anyio.to_thread.run_sync(
            lambda: manager.adapters.register(path, base=base, name=name, origin="runtime"))
    else:
        record = await anyio.to_thread.run_sync(manager.adapters.get, name)
    async with manager.hold(record.base_variant) as served:
        lm = served.base
        if not isinstance(lm.engine, ServesLora):
            raise InvalidRequestError(f"model '{lm.alias}' ({lm.engine.info.engine}) does not serve LoRA "
                                      "adapters", param="lora_name")
        ref = LoraRef(record.name, record.path, record.sha256)
        await anyio.to_thread.run_sync(lm.engine.preload_lora, ref)
    return JSONResponse({"object": "lora_adapter", "lora_name": record.name, "model": record.model_name,
                         "parent": record.base, "loaded": True,
                         "message": f"Success: LoRA adapter '{record.name}' added successfully."})


@router.post("/v1/unload_lora_adapter", openapi_extra=_body_schema(UnloadLoraAdapterRequest))
async def unload_lora_adapter(request: Request) -> JSONResponse:
    core = get_core(request)
    body = await parse_body(request, UnloadLoraAdapterRequest, core.settings)
    name = check_name(body.lora_name, param="lora_name")
    manager = core.manager
    record = await anyio.to_thread.run_sync(manager.adapters.get, name)
    freed = 0
    for lm in manager.loaded():
        if isinstance(lm.engine, ServesLora):
            freed += lm.engine.unload_lora(record.name)
    removed = False
    if record.source == "runtime":
        await anyio.to_thread.run_sync(manager.adapters.remove, name)
        removed = True
    return JSONResponse({"object": "lora_adapter", "lora_name": record.name, "unloaded": freed > 0,
                         "unregistered": removed,
                         "message": f"Success: LoRA adapter '{record.name}' removed successfully."})
