"""Anthropic Messages API routes. Errors here come out in Anthropic's shape (server/errors.py
chooses the shape by route)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ...protocol.anthropic import CountTokensRequest, MessagesRequest, TokenCount
from ..adapters.messages import MessagesFrontEnd, messages_ask
from ..body import parse_body
from ..state import get_core

router = APIRouter()


def _body_schema(model: type) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


@router.post("/v1/messages", openapi_extra=_body_schema(MessagesRequest))
async def create_message(request: Request) -> Response:
    return await get_core(request).serving.handle(request, MessagesFrontEnd)


@router.post("/v1/messages/count_tokens", openapi_extra=_body_schema(CountTokensRequest))
async def count_tokens(request: Request) -> TokenCount:
    """The prompt of a Messages request in tokens: the same ask and renderer as /v1/messages, so
    it equals that request's ``usage.input_tokens``."""
    core = get_core(request)
    body = await parse_body(request, CountTokensRequest, get_core(request).settings)
    ask = messages_ask(body)
    n_tokens = await core.generator.count_prompt_tokens(ask)
    return TokenCount(input_tokens=n_tokens)
