"""Parse request bodies as JSON whatever the Content-Type (``curl -d`` sends form encoding).

Structural limits are checked here, before a request reaches a model: JSON nesting depth (deep
nesting costs recursion in every later step: validation, schema compilation, grammar building),
the number of tools and the size of each JSON schema. Each is a 400 in milliseconds.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..config import Settings
from ..errors import InvalidRequestError
from .errors import invalid_request_from_errors

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 128
"""Deepest nesting of arrays/objects accepted in a body (JSON schemas in practice stay under 20)."""


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (a scalar is 0, ``[]`` is 1)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


async def parse_body(request: Request, model: type[M], settings: Settings | None = None) -> M:
    """The body as ``model``; with ``settings``, their tool and schema limits are checked first."""
    raw = await request.body()
    if not raw.strip():
        raise InvalidRequestError("The request body is empty; send a JSON object.", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequestError(
            "We could not parse the JSON body of your request: it must be a JSON object.",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.", code="invalid_json")
    if settings is not None:  # before validation: 20,000 tools cost pydantic ~0.3 s to validate
        check_structure_limits(data, settings)
    if json_depth(data) > MAX_JSON_DEPTH:
        raise InvalidRequestError(
            f"The request body nests too deeply (more than {MAX_JSON_DEPTH} levels).", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None
    except RecursionError:
        raise InvalidRequestError("The request body nests too deeply.", code="invalid_json") from None


def check_structure_limits(data: dict[str, Any], settings: Settings) -> None:
    """Too many tools, or a JSON schema over ``max_schema_bytes``: 400 naming the field."""
    tools = data.get("tools")
    if isinstance(tools, list):
        if len(tools) > settings.max_tools:
            raise InvalidRequestError(
                f"at most {settings.max_tools} tools are allowed (got {len(tools)})", param="tools",
                code="invalid_value")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                continue
            function = tool.get("function")
            if isinstance(function, dict):  # Chat Completions
                _check_schema_size(function.get("parameters"), settings, f"tools[{i}].function.parameters")
            for key in ("parameters", "input_schema"):  # Responses; Anthropic Messages
                _check_schema_size(tool.get(key), settings, f"tools[{i}].{key}")
    rf = data.get("response_format")
    if isinstance(rf, dict) and isinstance(rf.get("json_schema"), dict):
        _check_schema_size(rf["json_schema"].get("schema"), settings, "response_format")


def _check_schema_size(schema: Any, settings: Settings, param: str) -> None:
    if schema is None:
        return
    try:
        size = len(json.dumps(schema, separators=(",", ":")))
    except RecursionError:
        raise InvalidRequestError("The request body nests too deeply.", code="invalid_json") from None
    if size > settings.max_schema_bytes:
        raise InvalidRequestError(
            f"the JSON schema is {size} bytes; at most {settings.max_schema_bytes} are allowed",
            param=param, code="invalid_value")
