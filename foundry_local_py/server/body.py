"""Parse request bodies as JSON whatever the Content-Type (``curl -d`` sends form encoding)."""

from __future__ import annotations

import json
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequestError
from .errors import invalid_request_from_errors

M = TypeVar("M", bound=BaseModel)


async def parse_body(request: Request, model: type[M]) -> M:
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
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None
    except RecursionError:
        raise InvalidRequestError("The request body nests too deeply.", code="invalid_json") from None
