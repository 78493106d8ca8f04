"""The one place that maps exceptions to HTTP responses (OpenAI error shape)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import FoundryError, InvalidRequestError, RateLimitError

log = logging.getLogger(__name__)


def error_response(
    status: int, message: str, *, type_: str, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return str(getattr(request.state, "request_id", "unknown"))


def foundry_error_response(exc: FoundryError, request_id: str | None = None) -> JSONResponse:
    headers: dict[str, str] = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(exc.retry_after)
    message = exc.message
    if exc.status >= 500 and request_id:
        message = f"{message} (request id {request_id})"
    return error_response(exc.status, message, type_=exc.type, param=exc.param, code=exc.code,
                          headers=headers or None)


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
        return foundry_error_response(exc, request_id(request))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return foundry_error_response(invalid_request_from_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(404, f"Unknown route: {request.method} {request.url.path[:200]}",
                                  type_="invalid_request_error", code="not_found")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed here.",
                                  type_="invalid_request_error", code="method_not_allowed")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        return error_response(exc.status_code, detail, type_="invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("unhandled error in request %s", rid, exc_info=exc)
        # Starlette runs this handler outside every middleware, GuardMiddleware included, so the
        # X-Request-Id header it adds to all other responses is set here.
        return error_response(500, f"The server had an error processing your request (request id {rid}).",
                              type_="server_error", code="internal_error", headers={"X-Request-Id": rid})
