"""OpenAI-compatible routes. Thin: each hands its request to the serving core with its front-end."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from ...cache.adapters import AdapterRecord
from ...cache.catalog import CatalogModel, Variant
from ...engines.backends import backend_for
from ...errors import ModelNotFoundError
from ...protocol.chat import ChatCompletionRequest
from ...protocol.completions import CompletionRequest
from ...protocol.embeddings import EmbeddingRequest
from ...protocol.models import ModelCard, ModelList
from ..adapters.chat import ChatFrontEnd, chat_ask
from ..adapters.completions import CompletionFrontEnd
from ..adapters.embeddings import create_embeddings
from ..body import parse_body
from ..state import Core, get_core

router = APIRouter()


def _body_schema(model: type) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


@router.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    return await get_core(request).serving.handle(request, ChatFrontEnd)


@router.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
async def completions(request: Request) -> Response:
    return await get_core(request).serving.handle(request, CompletionFrontEnd)


@router.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
async def embeddings(request: Request) -> Response:
    return await create_embeddings(get_core(request).serving, request)


CHAT_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages")


def _endpoints(task: str, embeddings: bool) -> list[str]:
    """The routes a model of this catalog task answers (its engine's capabilities add embeddings)."""
    routes = {"chat-completion": list(CHAT_ENDPOINTS), "text-completion": ["/v1/completions"]}.get(task, [])
    return [*routes, *(["/v1/embeddings"] if embeddings or task == "embeddings" else [])]


def model_cards(core: Core) -> list[ModelCard]:
    """One card per model alias available here: its loaded variant, else its newest cached one."""
    cards = []
    loaded = {lm.alias: lm for lm in core.manager.loaded()}
    for model in core.catalog.models:
        lm = loaded.get(model.alias)
        cached = [v for v in model.variants if core.store.is_available(model, v)]
        if lm is None and not cached:
            continue
        cards.append(_card(core, model, lm.variant if lm else max(cached, key=lambda v: v.version)))
    for record in core.manager.adapters.list():
        cards.append(_adapter_card(core, record))
    return cards


def _adapter_card(core: Core, record: AdapterRecord) -> ModelCard:
    """A registered LoRA adapter, listed as its own model (``BASE:NAME``) with its parent."""
    lm = core.manager.find_loaded(record.base_variant)
    try:
        task = core.catalog.lookup(record.base)[0].task
    except ModelNotFoundError:
        task = "chat-completion"
    return ModelCard(
        id=record.model_name, owned_by="user", parent=record.base, root=record.name,
        loaded=lm is not None and record.name in lm.loaded_adapters(), cached=True,
        variant=record.base_variant, engine=lm.engine.info.engine if lm else "llama.cpp",
        device=lm.engine.info.device if lm else "cpu",
        context_length=lm.engine.info.n_ctx if lm else None,
        endpoints=[e for e in _endpoints(task, False) if e != "/v1/embeddings"],
    )


def _card(core: Core, model: CatalogModel, variant: Variant) -> ModelCard:
    lm = next((m for m in core.manager.loaded() if m.id == variant.id), None)
    return ModelCard(
        id=model.alias, owned_by=model.publisher, loaded=lm is not None,
        cached=any(core.store.is_available(model, v) for v in model.variants),
        variant=variant.id, root=variant.id, engine=lm.engine.info.engine if lm else None,
        device=lm.engine.info.device if lm else variant.device,
        context_length=lm.engine.info.n_ctx if lm else model.context_length,
        endpoints=_endpoints(model.task, (lm.engine.info.capabilities if lm else
                                          backend_for(variant.format).capabilities).embeddings),
    )


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=model_cards(get_core(request)))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, request: Request) -> ModelCard:
    core = get_core(request)
    adapter = core.manager.find_adapter(model_id)
    if adapter is not None:
        return _adapter_card(core, adapter)
    model, variant = core.catalog.lookup(model_id)
    if variant is None:  # an alias: its card in the list
        for card in model_cards(core):
            if card.id == model.alias:
                return card
    elif core.store.is_available(model, variant) or core.manager.find_loaded(variant.id):
        # A variant id: that variant's card, whichever variant of the alias is loaded.
        card = _card(core, model, variant)
        card.id = model_id
        return card
    raise ModelNotFoundError(model_id, detail="It is not available on this machine.")


@router.post("/v1/chat/completions/tokenizer/encode/count")
async def count_tokens(request: Request) -> JSONResponse:
    """Foundry Local's token counter: the chat request's prompt length in tokens, rendered by the
    same renderer as the chat itself (so it equals ``usage.prompt_tokens``)."""
    core = get_core(request)
    body = await parse_body(request, ChatCompletionRequest, core.settings)
    ask = chat_ask(body)
    n_tokens = await core.generator.count_prompt_tokens(ask)
    return JSONResponse({"tokenCount": n_tokens})
