"""The SDK's requests through the server's own layers, without HTTP.

A chat from :class:`~.chat_client.ChatClient` takes the path an HTTP request takes, minus the
socket: the wire type validates it (:mod:`...protocol`), the API's front-end turns it into
generation asks (``ChatFrontEnd.asks``), the generation core resolves the model, validates once
and queues on the model's scheduler (``core.generator``), and the serving core's collector or
stream produces the output the front-end formats (``ChatFrontEnd.body`` / ``stream_*``). So an
in-process answer is byte for byte what ``/v1/chat/completions`` returns, requests are counted in
``/metrics`` (endpoint ``sdk:<route>``), and in-process and HTTP requests share batches.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ...errors import FoundryError, InvalidRequestError
from ...generation import new_id
from ...scheduler.scheduler import ErrorEvent
from ...server.errors import invalid_request_from_errors
from ...server.serving import FrontEnd, Recorder, collect
from ...server.state import Core

M = TypeVar("M", bound=BaseModel)


def wire_request(model: type[M], data: dict[str, Any]) -> M:
    """``data`` as the API's wire type, with the errors an HTTP client would get (400s)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None


async def run(core: Core, api: type[FrontEnd[Any]], req: Any) -> dict[str, Any] | AsyncIterator[bytes]:
    """``ServingCore.handle`` minus HTTP: the JSON body, or for a streaming request the framed
    stream (each item one SSE event; closing it early cancels the generation)."""
    recorder = Recorder(core.metrics, f"sdk:{api.endpoint}", new_id("sdk"))
    try:
        asks = api.asks(req, core.settings)
        async with core.generator.resolved(asks) as model:
            recorder.bind(model.alias, model.adapter.name if model.adapter else "")
            gen = await core.generator.start(model, asks, api.id_prefix)
        recorder.prompt_tokens, recorder.adapter = gen.prompt_tokens, gen.adapter_label
        try:
            firsts = await gen.first_events()
            for event in firsts:
                if isinstance(event, ErrorEvent):
                    raise event.error
            fe = api(req, gen)
            if api.streams(req):
                return core.serving.stream(fe, gen, firsts, recorder)
            outcome = await collect(gen, firsts, recorder)
            body = fe.body(outcome)
            await fe.completed(outcome)
        except BaseException:
            gen.cancel()
            raise
        recorder.close("200")
        return body
    except BaseException as exc:
        recorder.close_for(exc)
        raise


def sse_payloads(frame: bytes) -> list[dict[str, Any]]:
    """The JSON objects in framed SSE events (``[DONE]`` and comments left out); an error
    object raises the error it describes."""
    out = []
    for line in frame.decode("utf-8").splitlines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            continue
        obj = json.loads(data)
        if isinstance(obj, dict) and "error" in obj and "choices" not in obj:
            err = obj["error"] or {}
            raise _StreamError(str(err.get("message", "the generation failed")))
        out.append(obj)
    return out


class _StreamError(FoundryError):
    status = 500


async def embeddings(core: Core, data: dict[str, Any]) -> dict[str, Any]:
    """``/v1/embeddings`` run in-process: the route's handler on a request built in memory."""
    from starlette.requests import Request

    from ...server.adapters.embeddings import create_embeddings

    body = json.dumps(data).encode()
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [
        (b"content-type", b"application/json")], "query_string": b"", "state": {}}
    response = await create_embeddings(core.serving, Request(scope, receive))
    result: dict[str, Any] = json.loads(bytes(response.body))
    if response.status_code != 200:
        raise InvalidRequestError(str(result))
    return result
