"""One error map, two shapes: OpenAI's everywhere, Anthropic's on /v1/messages*, refusals by the
request guards included; the API key as ``Authorization: Bearer`` or ``x-api-key``. In-process,
no model needed (the same refusals on the real server are in tests/api/test_messages.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from foundry_local_py.config import Settings
from foundry_local_py.errors import InvalidRequestError, QueueTimeoutError, RateLimitError
from foundry_local_py.server.app import create_app
from foundry_local_py.server.errors import error_style, foundry_error_body
from tests.support.serving import assert_no_leaks, assert_openai_error

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-key"


def assert_anthropic_error(r: httpx.Response, status: int, type_: str) -> str:
    """``r`` is ``status`` with exactly Anthropic's error shape; returns the message."""
    assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"}, body
    assert body["error"]["type"] == type_, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert r.headers.get("request-id", "").startswith("req_")
    assert_no_leaks(r.text)
    return str(body["error"]["message"])


def _app(tmp_path: Path, **kw: Any) -> Iterator[TestClient]:
    settings = Settings(cache_dir=tmp_path / "cache", preload=False, n_threads=1,
                        allowed_hosts=["testserver"], **kw)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def app(tmp_path: Path) -> Iterator[TestClient]:
    yield from _app(tmp_path)


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[TestClient]:
    yield from _app(tmp_path, api_key=KEY, max_body_bytes=4096)


def test_style_by_route() -> None:
    assert error_style("/v1/messages") == "anthropic"
    assert error_style("/v1/messages/count_tokens") == "anthropic"
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/messagesx", "/v1/models", "/"):
        assert error_style(path) == "openai"


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (InvalidRequestError("bad", param="x"), 400, "invalid_request_error"),
        (RateLimitError("full"), 429, "rate_limit_error"),
        (QueueTimeoutError("waited too long"), 529, "overloaded_error"),
    ],
)
def test_anthropic_body_of_our_errors(exc: Any, status: int, type_: str) -> None:
    got_status, body = foundry_error_body(exc, "req_1", "anthropic")
    assert got_status == status
    assert body["error"]["type"] == type_
    if status >= 500:
        assert "req_1" in body["error"]["message"]
    # the OpenAI shape of the same error is unchanged
    o_status, o_body = foundry_error_body(exc, "req_1")
    assert o_status == exc.status and set(o_body["error"]) == {"message", "type", "param", "code"}


def test_unknown_route_and_method_in_each_style(app: TestClient) -> None:
    assert_openai_error(app.post("/v1/nothing-here", json={}), 404, code="not_found")
    assert_anthropic_error(app.get("/v1/messages/nothing-here"), 404, "not_found_error")
    assert_openai_error(app.get("/v1/chat/completions"), 405, code="method_not_allowed")
    assert_anthropic_error(app.put("/v1/messages/count_tokens", json={}), 405, "invalid_request_error")


def test_api_key_as_bearer_or_x_api_key(keyed: TestClient) -> None:
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert keyed.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
    # either header with the right key passes, whatever the other holds
    both = {"x-api-key": KEY, "Authorization": "Bearer no"}
    assert keyed.get("/v1/models", headers=both).status_code == 200
    for headers in ({}, {"x-api-key": "no"}, {"Authorization": f"Basic {KEY}"}, {"x-api-key": ""},
                    {"Authorization": "Bearer"}):
        err = assert_openai_error(keyed.get("/v1/models", headers=headers), 401, code="invalid_api_key",
                                  type_="authentication_error")
        assert "x-api-key" in err["message"]
        r = keyed.post("/v1/messages", headers=headers, json={})
        assert_anthropic_error(r, 401, "authentication_error")
    # /health stays public
    assert keyed.get("/health").status_code in (200, 503)


def test_guard_refusals_in_anthropic_shape(keyed: TestClient) -> None:
    h = {"x-api-key": KEY}
    assert_anthropic_error(keyed.post("/v1/messages", headers=h, content=b"x" * 5000), 413,
                           "request_too_large")
    assert_openai_error(keyed.post("/v1/chat/completions", headers=h, content=b"x" * 5000), 413,
                        code="request_too_large")
    r = keyed.post("/v1/messages", headers={**h, "host": "evil.example"}, json={})
    assert_anthropic_error(r, 403, "permission_error")  # a foreign Host (issue 13: 403)
    many = {f"x-h{i}": "v" for i in range(300)}
    assert_anthropic_error(keyed.post("/v1/messages", headers={**h, **many}, json={}), 431,
                           "invalid_request_error")


def test_openapi_lists_the_new_routes(app: TestClient) -> None:
    r = app.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    paths = doc["paths"]
    for path, method in [("/v1/responses", "post"), ("/v1/responses/{response_id}", "get"),
                         ("/v1/responses/{response_id}", "delete"),
                         ("/v1/responses/{response_id}/input_items", "get"),
                         ("/v1/responses/input_tokens", "post"), ("/v1/messages", "post"),
                         ("/v1/messages/count_tokens", "post")]:
        assert method in paths.get(path, {}), path
    schemas = doc["components"]["schemas"]
    assert {"ResponseCreateRequest", "MessagesRequest", "CountTokensRequest"} <= set(schemas)
