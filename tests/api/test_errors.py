"""Bad input (raw httpx): every refusal is a 4xx in the OpenAI error shape, names the bad field,
leaks nothing, and leaves the server serving. Items 1, 3-10 and 21 of the bad-input checklist."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from tests.support.serving import SMOLLM, assert_openai_error, chat_body

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/v1/chat/completions/tokenizer/encode/count"])
@pytest.mark.parametrize(
    "raw",
    [
        b"{bad json",
        b'"a string"',
        b"[1, 2]",
        b"42",
        b"null",
        b"true",
        b"",
        b"   ",
        b"\xff\xfe{}",
        b'{"model": "x",',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"NaN",
    ],
)
def test_body_not_a_json_object(http: httpx.Client, path: str, raw: bytes) -> None:
    for content_type in ("application/json", "application/x-www-form-urlencoded"):
        r = http.post(path, content=raw, headers={"content-type": content_type})
        assert_openai_error(r, 400, code="invalid_json", param=None, type_="invalid_request_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "model"),
        ({"model": SMOLLM}, "messages"),
        ({"model": 7, "messages": MSG}, "model"),
        ({"model": "", "messages": MSG}, "model"),
        ({"model": SMOLLM, "messages": []}, "messages"),
        ({"model": SMOLLM, "messages": "hi"}, "messages"),
        ({"model": SMOLLM, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": SMOLLM, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": SMOLLM, "messages": [{"role": "user", "content": {"a": 1}}]}, "messages[0].content"),
        ({"model": SMOLLM, "messages": [{"role": "user"}]}, "messages[0]"),
        ({"model": SMOLLM, "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": SMOLLM, "messages": [MSG[0], "x"]}, "messages[1]"),
        (
            {
                "model": SMOLLM,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            },
            "messages[0].content",
        ),
    ],
)
def test_bad_messages(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    r = http.post(CHAT, json=body)
    err = assert_openai_error(r, 400, param=param, type_="invalid_request_error")
    assert err["code"] in ("invalid_value", "missing_required_parameter")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("max_tokens", -1),
        ("max_tokens", 1.5),
        ("max_tokens", "5"),
        ("max_tokens", True),
        ("max_tokens", 2**31),
        ("max_tokens", 10**30),
        ("max_completion_tokens", 0),
        ("temperature", 2.5),
        ("temperature", -0.1),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_p", -1),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("seed", 2**64),
        ("seed", "x"),
        ("n", 2),
        ("n", 0),
        ("stream", "yes"),
        ("stream_options", {"include_usage": "yes"}),
        ("logprobs", "yes"),
        ("top_logprobs", -1),
        ("top_logprobs", 21),
        ("logit_bias", {"abc": 1}),
        ("logit_bias", {"1": 101}),
        ("logit_bias", {"99999999": 1}),
        ("logit_bias", {str(i): 1 for i in range(301)}),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", "x" * 257),
        ("stop", [""]),
        ("stop", [1]),
        ("response_format", {"type": "yaml"}),
        ("response_format", {"type": "json_schema"}),
        ("tool_choice", "auto"),
        ("tools", [{"type": "function", "function": {"name": "bad name!"}}]),
    ],
)
def test_out_of_range_fields(http: httpx.Client, field: str, value: Any) -> None:
    body = chat_body(**{field: value})
    if field == "top_logprobs" and value == 21:
        body["logprobs"] = True
    r = http.post(CHAT, json=body)
    err = assert_openai_error(r, 400, type_="invalid_request_error")
    assert err["param"] is not None and err["param"].split(".")[0].split("[")[0] == field, err


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
def test_non_finite_numbers(http: httpx.Client, field: str, literal: str) -> None:
    raw = json.dumps(chat_body())[:-1] + f', "{field}": {literal}}}'
    r = http.post(CHAT, content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400, param=field)


def test_top_logprobs_needs_logprobs(http: httpx.Client) -> None:
    r = http.post(CHAT, json=chat_body(top_logprobs=2))
    assert_openai_error(r, 400, param="top_logprobs")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": SMOLLM}, "prompt"),
        ({"model": SMOLLM, "prompt": ""}, "prompt"),
        ({"model": SMOLLM, "prompt": []}, "prompt"),
        ({"model": SMOLLM, "prompt": ["ok", ""]}, "prompt"),
        ({"model": SMOLLM, "prompt": [[]]}, "prompt"),
        ({"model": SMOLLM, "prompt": 5}, "prompt"),
        ({"model": SMOLLM, "prompt": [-1]}, "prompt"),
        ({"model": SMOLLM, "prompt": [10**9]}, "prompt"),
        ({"model": SMOLLM, "prompt": ["a"] * 17}, "prompt"),
        ({"model": SMOLLM, "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": SMOLLM, "prompt": "x", "logprobs": 21}, "logprobs"),  # the field the client sent
        ({"model": SMOLLM, "prompt": "x", "suffix": "y"}, "suffix"),
        ({"model": SMOLLM, "prompt": "x", "best_of": 2}, "best_of"),
        ({"model": SMOLLM, "prompt": "x", "n": 3}, "n"),
        ({"model": SMOLLM, "prompt": "x", "echo": "yes"}, "echo"),
    ],
)
def test_bad_completion_requests(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    r = http.post(COMPLETIONS, json=body)
    err = assert_openai_error(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize(
    "name", ["no-such-model", "../../etc/passwd", "model.gguf", "smollm2-135m:999", "gpt-4o", "x" * 256]
)
def test_unknown_model_is_404(http: httpx.Client, path: str, name: str) -> None:
    body = chat_body(model=name) if path == CHAT else {"model": name, "prompt": "hi", "max_tokens": 2}
    r = http.post(path, json=body)
    assert_openai_error(r, 404, code="model_not_found", param="model")


def test_unknown_model_via_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=MSG)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_bad_request_via_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SMOLLM, messages=MSG, max_tokens=0)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SMOLLM, messages=MSG, n=2)
    assert info.value.body["param"] == "n"


def _n_ctx(http: httpx.Client) -> int:
    n = http.get(f"/v1/models/{SMOLLM}").json()["context_length"]
    assert isinstance(n, int) and n > 0
    return n


def test_context_length_exceeded_quotes_both_counts(http: httpx.Client) -> None:
    n_ctx = _n_ctx(http)
    long = "hello world " * n_ctx  # about 2 tokens a repetition: twice the context
    r = http.post(CHAT, json=chat_body(long))
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="messages")
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert n_ctx in numbers
    assert any(n > n_ctx for n in numbers), err["message"]
    r = http.post(COMPLETIONS, json={"model": SMOLLM, "prompt": long, "max_tokens": 2})
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")
    numbers = [int(n) for n in re.findall(r"\d+", err["message"])]
    assert n_ctx in numbers and any(n > n_ctx for n in numbers), err["message"]


def test_prompt_plus_max_tokens_over_context(http: httpx.Client) -> None:
    n_ctx = _n_ctx(http)
    r = http.post(CHAT, json=chat_body(max_tokens=n_ctx - 2))
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="max_tokens")
    assert str(n_ctx) in err["message"] and str(n_ctx - 2) in err["message"]


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "bogus"},
        {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}},
        {"type": "string", "pattern": "(((("},
        {"type": "object", "properties": {"a": {"type": ["string", {"nope": 1}]}}},
    ],
)
def test_invalid_json_schema_then_still_healthy(http: httpx.Client, schema: dict[str, Any]) -> None:
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = http.post(CHAT, json=chat_body(response_format=rf))
    assert_openai_error(r, 400, param="response_format")
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    r = http.post(CHAT, json=chat_body(tools=[tool], tool_choice="required"))
    assert_openai_error(r, 400, param="response_format")
    ok = http.post(CHAT, json=chat_body(max_tokens=2))
    assert ok.status_code == 200


def test_deeply_nested_schema(http: httpx.Client) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(400):
        schema = {"type": "object", "properties": {"a": schema}}
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = http.post(CHAT, json=chat_body(response_format=rf))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_openai_error(r, 400)
    assert http.post(CHAT, json=chat_body(max_tokens=2)).status_code == 200


def test_tool_choice_names_a_missing_tool(http: httpx.Client) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = http.post(
        CHAT, json=chat_body(tools=[tool], tool_choice={"type": "function", "function": {"name": "g"}})
    )
    assert_openai_error(r, 400, param="tool_choice")
    r = http.post(CHAT, json=chat_body(tools=[tool, tool]))
    assert_openai_error(r, 400, param="tools")


def test_limits_refused_without_blocking_the_loop(http: httpx.Client, base_url: str) -> None:
    """Refusals of n / top_logprobs / logit_bias come back while a long generation is still running."""
    from tests.support.serving import scrape

    with (
        httpx.Client(base_url=base_url, timeout=120) as other,
        other.stream(
            "POST", CHAT, json=chat_body("Tell me a long story.", max_tokens=1000, stream=True)
        ) as s,
    ):
        lines = s.iter_lines()
        next(lines)
        for body in (
            chat_body(n=5),
            chat_body(logprobs=True, top_logprobs=500),
            chat_body(logit_bias={str(i): 1 for i in range(5000)}),
        ):
            assert http.post(CHAT, json=body).status_code == 400
        assert http.get("/health").status_code == 200
        assert scrape(base_url).get("foundry_local_requests_running", model=SMOLLM) == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("PUT", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
        ("GET", "/v1/chat/completions", 405),
        ("POST", "/health", 405),
    ],
)
def test_unknown_routes_and_methods(http: httpx.Client, method: str, path: str, status: int) -> None:
    r = http.request(method, path)
    assert_openai_error(r, status)


def test_errors_are_counted_by_status(http: httpx.Client, base_url: str) -> None:
    from tests.support.serving import scrape

    before = scrape(base_url).get("foundry_local_requests_total", model=SMOLLM, status="400")
    http.post(
        CHAT, json=chat_body("x " * (2 * _n_ctx(http)))
    )  # context length: a 400 once the model is known
    after = scrape(base_url).get("foundry_local_requests_total", model=SMOLLM, status="400")
    assert after == before + 1
