"""OpenAI Responses API routes. Thin: generation goes through the serving core with the Responses
front-end; stored responses are read from and deleted in the response store."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from ...errors import NotFoundError
from ...protocol.responses import (
    DeletedResponse,
    InputItemList,
    InputTokenCount,
    InputTokensRequest,
    ResponseCreateRequest,
)
from ..adapters.responses import ResponsesCall, conversation, responses_ask, stored_items
from ..body import parse_body
from ..state import get_core

router = APIRouter()
ResponseId = Annotated[str, Query(min_length=1, max_length=256)]


def _body_schema(model: type) -> dict[str, object]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _not_found(response_id: str) -> NotFoundError:
    return NotFoundError(f"Response with id '{response_id[:64]}' not found.", param="response_id")


@router.post("/v1/responses", openapi_extra=_body_schema(ResponseCreateRequest))
async def create_response(request: Request) -> Response:
    core = get_core(request)
    return await core.serving.handle(request, core.responses_api)


@router.post("/v1/responses/input_tokens", openapi_extra=_body_schema(InputTokensRequest))
async def input_tokens(request: Request) -> InputTokenCount:
    """What a /v1/responses request's input costs, rendered by the same renderer as the request."""
    core = get_core(request)
    body = await parse_body(request, InputTokensRequest, get_core(request).settings)
    wire = ResponseCreateRequest.model_validate({**body.model_dump(by_alias=True, exclude_none=True),
                                                 "input": body.input if body.input is not None else []})
    call = ResponsesCall(wire=wire, history=await conversation(core.responses, body.previous_response_id),
                         new_items=stored_items(wire.items()))
    ask = responses_ask(call)
    n_tokens = await core.generator.count_prompt_tokens(ask)
    return InputTokenCount(input_tokens=n_tokens)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, request: Request) -> JSONResponse:
    stored = await get_core(request).responses.aget(response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> DeletedResponse:
    if not await get_core(request).responses.adelete(response_id):
        raise _not_found(response_id)
    return DeletedResponse(id=response_id)


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(max_length=256)] = None,
) -> InputItemList:
    """The items the response was generated from (the conversation it continued included),
    newest first unless ``order=asc``; ``after`` an item id, for the next page."""
    page = await get_core(request).responses.ainput_items(response_id, limit=limit, order=order, after=after)
    if page is None:
        raise _not_found(response_id)
    ids = [item["id"] for item in page.items]
    return InputItemList(data=page.items, first_id=ids[0] if ids else None,
                         last_id=ids[-1] if ids else None, has_more=page.has_more)
