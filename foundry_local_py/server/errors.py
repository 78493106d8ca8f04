"""The one place that maps exceptions to HTTP responses.

Two error shapes, chosen by the route: OpenAI's ``{"error": {"message", "type", "param", "code"}}``
everywhere, and Anthropic's ``{"type": "error", "error": {"type", "message"}}`` (with Anthropic's
type names and its 529 for "overloaded") on the Anthropic Messages routes, ``/v1/messages*``. The
request guards (server/middleware.py) render their refusals here too, so a 401 or 413 on an
Anthropic route is in Anthropic's shape as well.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FoundryError, InvalidRequestError, RateLimitError

log = logging.getLogger(__name__)


ErrorStyle = Literal["openai", "anthropic"]

ANTHROPIC_PREFIX = "/v1/messages"

# Anthropic's error types by status (https://docs.anthropic.com/en/api/errors); 503 becomes 529.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ANTHROPIC_OVERLOADED = 529


def error_style(path: str) -> ErrorStyle:
    """Which error shape a route answers in: Anthropic's on ``/v1/messages`` and below."""
    if path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/"):
        return "anthropic"
    return "openai"


def anthropic_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """(status, body) in Anthropic's shape for one of our errors (503 -> 529 overloaded_error)."""
    if status == 503:
        status = ANTHROPIC_OVERLOADED
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return status, {"type": "error", "error": {"type": kind, "message": message}}


def error_body(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
    style: ErrorStyle = "openai",
) -> tuple[int, dict[str, Any]]:
    """The (status, JSON body) of an error in the given style: every error body is built here."""
    if style == "anthropic":
        # Anthropic's shape has no 'param': the message names the field instead.
        return anthropic_error(status, f"{param}: {message}" if param and param not in message else message)
    return status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None, style: ErrorStyle = "openai",
) -> JSONResponse:
    status, body = error_body(status, message, type_=type_, param=param, code=code, style=style)
    return JSONResponse(body, status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))


def client_message(exc: FoundryError, request_id: str | None = None) -> str:
    """The message a client sees: 5xx quote the request id."""
    if exc.status >= 500 and request_id:
        return f"{exc.message} (request id {request_id})"
    return exc.message


def foundry_error_body(
    exc: FoundryError, request_id: str | None = None, style: ErrorStyle = "openai"
) -> tuple[int, dict[str, Any]]:
    """(status, body) of one of our errors; also what a stream sends when it fails mid-way."""
    return error_body(exc.status, client_message(exc, request_id), type_=exc.type, param=exc.param,
                      code=exc.code, style=style)


def foundry_error_response(
    exc: FoundryError, request_id: str | None = None, style: ErrorStyle = "openai"
) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(exc.retry_after)
    status, body = foundry_error_body(exc, request_id, style)
    return JSONResponse(body, status_code=status, headers=headers or None)


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    parts = [p for p in loc if p not in ("body", "query", "path")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not isinstance(p, str) or p.startswith(("function-after", "function-before")):
            continue
        elif "[" in p or p in ("str", "list[str]", "int", "dict[str,any]"):
            continue  # pydantic union-branch labels
        elif p.startswith("<") and p.endswith(">"):
            continue  # our discriminator tags (protocol/responses.py, protocol/anthropic.py)
        else:
            out += f".{p}" if out else p
    return out or None


def invalid_request_from_errors(errors: Sequence[Any]) -> InvalidRequestError:
    """Turn pydantic / FastAPI validation errors into one 400 naming the first bad field."""
    first = errors[0] if errors else {}
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    if kind in ("json_invalid", "json_type"):
        return InvalidRequestError(
            "We could not parse the JSON body of your request: it must be a JSON object.",
            code="invalid_json",
        )
    param = _param_from_loc(loc)
    if param is None and kind in ("model_attributes_type", "model_type", "dict_type", "missing"):
        return InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    msg = str(first.get("msg", "invalid value"))
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param,
                                   code="missing_required_parameter")
    message = f"Invalid value for '{param}': {msg}." if param else f"Invalid request: {msg}."
    return InvalidRequestError(message[:1000], param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FoundryError)
    async def _foundry(request: Request, exc: FoundryError) -> JSONResponse:
        if exc.status >= 500:
            log.error("request %s failed: %s", request_id(request), exc.message, exc_info=exc)
        return foundry_error_response(exc, request_id(request), error_style(request.url.path))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return foundry_error_response(invalid_request_from_errors(exc.errors()),
                                      style=error_style(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        style = error_style(request.url.path)
        if exc.status_code == 404:
            return error_response(404, f"Unknown route: {request.method} {request.url.path[:200]}",
                                  type_="invalid_request_error", code="not_found", style=style)
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed here.",
                                  type_="invalid_request_error", code="method_not_allowed", style=style)
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, type_="invalid_request_error", style=style)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("unhandled error in request %s", rid, exc_info=exc)
        style = error_style(request.url.path)
        # Starlette runs this handler outside every middleware, GuardMiddleware included, so the
        # request id headers it adds to all other responses are set here.
        headers = {"X-Request-Id": rid, **({"request-id": rid} if style == "anthropic" else {})}
        return error_response(500, f"The server had an error processing your request (request id {rid}).",
                              type_="server_error", code="internal_error", headers=headers, style=style)
