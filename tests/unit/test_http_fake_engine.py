"""The HTTP layer in-process on a FAKE engine injected through create_app(settings, engine_loader=...):
paths the real model cannot be made to take on demand (a failure after the stream started, a slow
load), plus guard settings (API key, CORS). The same routes run on the real model in tests/api."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from foundry_local_py.engines.backends import EngineOptions
from foundry_local_py.server import middleware
from foundry_local_py.server.app import create_app
from tests.support.fake_app import Loader, fake_settings, wait_health
from tests.support.fake_engine import FakeEngine
from tests.support.serving import Metrics, assert_openai_error, sse_json

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def loader() -> Loader:
    return Loader()


@pytest.fixture
def app_client(tmp_path: Path, loader: Loader) -> Iterator[TestClient]:
    with TestClient(create_app(fake_settings(tmp_path), engine_loader=loader)) as c:
        assert wait_health(c) == 200
        yield c


CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


def test_fake_engine_serves(app_client: TestClient) -> None:
    r = app_client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["message"]["content"] == "Hello, world!"
    assert body["usage"]["completion_tokens"] == 4


# --- failure after the stream started ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        ("/v1/completions", {"model": "fake-chat", "prompt": "hi", "max_tokens": 50, "stream": True}),
    ],
)
def test_error_after_stream_start_is_an_sse_error_then_done(
    app_client: TestClient, loader: Loader, path: str, body: dict[str, Any]
) -> None:
    loader.script.fail_at = 2  # two tokens out, then the engine fails this sequence
    with app_client.stream("POST", path, json=body) as r:
        assert r.status_code == 200  # headers went out with the first token
        assert r.headers["x-request-id"].startswith("req_")
        raw = r.read()
    chunks = sse_json(raw)  # framing intact, exactly one final [DONE]
    *data, error = chunks
    assert set(error) == {"error"}
    err = error["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "server_error" and err["code"] == "engine_error"
    text = "".join(
        (c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text") or "")
        for c in data
        if c.get("choices")
    )
    assert text == "Hello,"  # what was generated before the failure was delivered
    assert all(c["choices"][0]["finish_reason"] is None for c in data if c.get("choices"))
    m = Metrics(app_client.get("/metrics").text)
    assert m.get("foundry_local_requests_total", model="fake-chat", endpoint=path, status="500") == 1
    loader.script.fail_at = None
    assert app_client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


def test_openai_client_raises_on_the_error_event(app_client: TestClient, loader: Loader) -> None:
    loader.script.fail_at = 1
    client = openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=app_client, max_retries=0
    )
    stream = client.chat.completions.create(
        model="fake-chat", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="failed"):
        for _ in stream:
            pass


def test_failure_before_the_first_token_is_a_real_http_error(app_client: TestClient, loader: Loader) -> None:
    loader.script.fail_at = 0
    r = app_client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    err = assert_openai_error(r, 500, code="engine_error")
    assert r.headers["x-request-id"] in err["message"]


def test_unexpected_exception_is_a_clean_500(
    app_client: TestClient, loader: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(self: FakeEngine, text: str, *, add_special: bool = True) -> list[int]:
        raise RuntimeError("disk error at /secret/models/x.gguf")

    monkeypatch.setattr(FakeEngine, "tokenize", boom)
    quiet = TestClient(app_client.app, raise_server_exceptions=False)  # same app, already started
    r = quiet.post("/v1/chat/completions", json=CHAT)
    err = assert_openai_error(r, 500, code="internal_error")
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-request-id"] in err["message"]


def test_base_model_refuses_chat(app_client: TestClient) -> None:
    r = app_client.post("/v1/chat/completions", json={**CHAT, "model": "fake-base"})
    assert_openai_error(r, 400, code="model_not_chat", param="model")
    r = app_client.post("/v1/completions", json={"model": "fake-base", "prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello, world"


def test_structured_output_unsupported_by_engine_is_400(app_client: TestClient) -> None:
    r = app_client.post("/v1/chat/completions", json={**CHAT, "response_format": {"type": "json_object"}})
    assert_openai_error(r, 400, param="response_format")


# --- /health while loading --------------------------------------------------------------------


def test_health_is_503_while_the_default_model_loads(tmp_path: Path, loader: Loader) -> None:
    loader.gate = threading.Event()
    with TestClient(create_app(fake_settings(tmp_path), engine_loader=loader)) as c:
        r = c.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "loading"
        loader.gate.set()
        assert wait_health(c) == 200
        assert c.get("/health").json()["loaded"] == ["fake-chat-cpu:1"]
    assert all(e.closed for e in loader.engines)  # unloaded at shutdown


def test_health_reports_a_failed_preload(tmp_path: Path) -> None:
    def broken(fmt: str, path: Path, options: EngineOptions) -> FakeEngine:
        from foundry_local_py.errors import ModelLoadError

        raise ModelLoadError("the model file could not be loaded")

    with TestClient(create_app(fake_settings(tmp_path), engine_loader=broken)) as c:
        assert wait_health(c) == 200
        body = c.get("/health").json()
        assert "could not be loaded" in body["error"]


# --- guards configured by settings ------------------------------------------------------------


def test_api_key_compared_in_constant_time(
    tmp_path: Path, loader: Loader, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = middleware.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    with TestClient(create_app(fake_settings(tmp_path, api_key="k3y"), engine_loader=loader)) as c:
        assert wait_health(c) == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/models", headers={"authorization": "Bearer k3y"}).status_code == 200
    assert calls == [(b"nope", b"k3y"), (b"k3y", b"k3y")]


@pytest.mark.parametrize(
    ("origins", "origin", "allow", "credentials"),
    [
        (["*"], "http://any.example", "*", None),
        (["http://app.example"], "http://app.example", "http://app.example", "true"),
        (["http://app.example"], "http://evil.example", None, Any),
        ([], "http://app.example", None, None),
    ],
)
def test_cors_never_star_with_credentials(
    tmp_path: Path, loader: Loader, origins: list[str], origin: str, allow: str | None, credentials: object
) -> None:
    with TestClient(create_app(fake_settings(tmp_path, cors_origins=origins), engine_loader=loader)) as c:
        r = c.options(
            "/v1/chat/completions", headers={"origin": origin, "access-control-request-method": "POST"}
        )
        assert r.headers.get("access-control-allow-origin") == allow
        if credentials is not Any:
            assert r.headers.get("access-control-allow-credentials") == credentials
        if allow == "*":
            assert r.headers.get("access-control-allow-credentials") != "true"
