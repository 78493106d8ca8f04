"""Property tests (hypothesis) of the request models (protocol/) and of body parsing
(server/body.py): any bytes, any JSON, any value in any known field gives either a request or a
400 ``InvalidRequestError`` naming a field; never another exception (which would be a 500). Valid
requests survive a round trip through their wire form."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from foundry_local_py.config import Settings
from foundry_local_py.errors import InvalidRequestError
from foundry_local_py.protocol.chat import ChatCompletionRequest
from foundry_local_py.protocol.completions import CompletionRequest
from foundry_local_py.protocol.embeddings import EmbeddingRequest
from foundry_local_py.server.body import MAX_JSON_DEPTH, json_depth, parse_body
from foundry_local_py.server.errors import invalid_request_from_errors

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODELS: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, EmbeddingRequest]

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)


def _fields(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _request(raw: bytes, settings_: Settings | None = None) -> Any:
    async def body() -> bytes:
        return raw

    core = SimpleNamespace(settings=settings_ or Settings())
    return SimpleNamespace(body=body, app=SimpleNamespace(state=SimpleNamespace(core=core)))


def _parse(raw: bytes, model: type[BaseModel]) -> BaseModel | InvalidRequestError:
    try:
        return asyncio.run(parse_body(_request(raw), model))
    except InvalidRequestError as exc:
        return exc


def _check_refusal(err: InvalidRequestError) -> None:
    assert err.status == 400
    assert err.message and len(err.message) <= 1000
    assert err.code in ("invalid_json", "invalid_value", "missing_required_parameter")


@pytest.mark.parametrize("model", MODELS)
@SETTINGS
@given(data=st.data())
def test_any_value_in_any_field_is_a_request_or_a_400(model: type[BaseModel], data: st.DataObject) -> None:
    names = _fields(model)
    body = data.draw(st.dictionaries(st.sampled_from([*names, "extra"]), JSON, max_size=len(names)))
    try:
        model.model_validate(body)
    except ValidationError as exc:
        _check_refusal(invalid_request_from_errors(exc.errors()))
    out = _parse(json.dumps(body).encode(), model)
    if isinstance(out, InvalidRequestError):
        _check_refusal(out)


@pytest.mark.parametrize("model", MODELS)
@SETTINGS
@given(raw=st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode())))
def test_any_bytes_are_a_request_or_a_400(model: type[BaseModel], raw: bytes) -> None:
    out = _parse(raw, model)
    if isinstance(out, InvalidRequestError):
        _check_refusal(out)


@SETTINGS
@given(depth=st.integers(min_value=1, max_value=20_000), kind=st.sampled_from(["[", '{"a":']))
def test_any_nesting_is_parsed_or_refused_as_invalid_json(depth: int, kind: str) -> None:
    close = "]" if kind == "[" else "}"
    inner = kind * depth + "1" + close * depth
    raw = ('{"model": "m", "prompt": "x", "user": ' + inner + "}").encode()
    out = _parse(raw, CompletionRequest)
    if depth + 1 > MAX_JSON_DEPTH:
        assert isinstance(out, InvalidRequestError) and out.code == "invalid_json"
    elif isinstance(out, InvalidRequestError):
        _check_refusal(out)  # 'user' must be a string: a 400 naming it


MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                           "content": st.text(min_size=0, max_size=40)}),
    min_size=1, max_size=4,
)
CHAT = st.fixed_dictionaries(
    {"model": st.text(min_size=1, max_size=40), "messages": MESSAGES},
    optional={
        "max_tokens": st.integers(1, 2**31 - 1),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "top_k": st.integers(0, 100_000),
        "seed": st.integers(-(2**63), 2**64 - 1),
        "stop": st.one_of(st.text(min_size=1, max_size=8),
                          st.lists(st.text(min_size=1, max_size=8), max_size=4)),
        "stream": st.booleans(),
        "presence_penalty": st.floats(-2, 2),
        "logit_bias": st.dictionaries(st.integers(0, 50_000).map(str), st.floats(-100, 100), max_size=5),
        "logprobs": st.booleans(),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}]),
    },
)


@SETTINGS
@given(body=CHAT)
def test_valid_chat_requests_validate_and_round_trip(body: dict[str, Any]) -> None:
    req = ChatCompletionRequest.model_validate(body)
    again = ChatCompletionRequest.model_validate(req.model_dump(by_alias=True, exclude_none=True))
    assert again == req
    parsed = _parse(json.dumps(body).encode(), ChatCompletionRequest)
    assert parsed == req


@SETTINGS
@given(prompt=st.one_of(st.text(min_size=1, max_size=40),
                        st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=4),
                        st.lists(st.integers(0, 50_000), min_size=1, max_size=8)),
       max_tokens=st.integers(1, 1000))
def test_valid_completion_requests_validate_and_round_trip(prompt: Any, max_tokens: int) -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": prompt, "max_tokens": max_tokens})
    assert req.prompts()
    assert CompletionRequest.model_validate(req.model_dump(by_alias=True, exclude_none=True)) == req


@given(value=JSON)
@settings(max_examples=300, deadline=None)
def test_json_depth_matches_a_recursive_count(value: Any) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    assert json_depth(value) == depth(value)
