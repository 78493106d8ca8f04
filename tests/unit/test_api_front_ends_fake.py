"""The Responses and Messages front-ends in-process on a FAKE engine: the failure paths the real
model cannot be made to take on demand (an engine failure after the stream started or before the
first token, a queue timeout), each in its API's own shape and counted under its endpoint. The
normal paths run on the real model in tests/api/test_responses.py and test_messages.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from foundry_local_py.server.app import create_app
from tests.support.fake_app import Loader, fake_settings, wait_health
from tests.support.serving import Metrics, assert_openai_error

pytestmark = pytest.mark.timeout(60)

RESPONSES = {"model": "fake-chat", "input": "hi", "max_output_tokens": 50}
MESSAGES = {"model": "fake-chat", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def loader() -> Loader:
    return Loader()


@pytest.fixture
def app_client(tmp_path: Path, loader: Loader) -> Iterator[TestClient]:
    with TestClient(create_app(fake_settings(tmp_path), engine_loader=loader)) as c:
        assert wait_health(c) == 200
        yield c


def events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in raw.decode("utf-8").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            name = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
            data = [ln[6:] for ln in lines if ln.startswith("data: ")]
            assert len(data) == 1, block
            out.append((name, json.loads(data[0])))
    return out


def count(c: TestClient, endpoint: str, status: str) -> float:
    return Metrics(c.get("/metrics").text).get("foundry_local_requests_total", model="fake-chat",
                                               endpoint=endpoint, status=status)


def test_fake_engine_serves_both(app_client: TestClient) -> None:
    r = app_client.post("/v1/responses", json=RESPONSES)
    assert r.status_code == 200 and r.json()["output"][0]["content"][0]["text"] == "Hello, world!"
    m = app_client.post("/v1/messages", json=MESSAGES)
    assert m.status_code == 200 and m.json()["content"] == [{"type": "text", "text": "Hello, world!"}]
    assert m.json()["stop_reason"] == "end_turn"


def test_responses_failure_mid_stream_is_response_failed(app_client: TestClient, loader: Loader) -> None:
    loader.script.fail_at = 2
    with app_client.stream("POST", "/v1/responses", json={**RESPONSES, "stream": True}) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        got = events(r.read())
    types = [d["type"] for _, d in got]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", "response.output_text.delta",
                     "response.output_text.delta", "response.failed"]
    assert [d["sequence_number"] for _, d in got] == list(range(len(got)))
    assert "".join(d["delta"] for _, d in got if d["type"] == "response.output_text.delta") == "Hello,"
    failed = got[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "engine_error" and rid in failed["error"]["message"]
    assert count(app_client, "/v1/responses", "500") == 1
    assert_openai_error(app_client.get(f"/v1/responses/{failed['id']}"), 404)  # a failure is not stored
    loader.script.fail_at = None
    assert app_client.post("/v1/responses", json=RESPONSES).status_code == 200


def test_openai_client_sees_response_failed(app_client: TestClient, loader: Loader) -> None:
    loader.script.fail_at = 1
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=app_client,
                           max_retries=0)
    with client.responses.stream(model="fake-chat", input="hi") as stream:
        last = list(stream)[-1]
        assert last.type == "response.failed"
        assert last.response.error is not None and last.response.error.code == "engine_error"
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            stream.get_final_response()


def test_messages_failure_mid_stream_is_an_error_event(app_client: TestClient, loader: Loader) -> None:
    loader.script.fail_at = 2
    with app_client.stream("POST", "/v1/messages", json={**MESSAGES, "stream": True}) as r:
        assert r.status_code == 200
        rid = r.headers["request-id"]
        got = events(r.read())
    names = [n for n, _ in got]
    assert names == ["message_start", "ping", "content_block_start", "content_block_delta",
                     "content_block_delta", "error"]
    assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") == "Hello,"
    error = got[-1][1]
    assert set(error) == {"type", "error"} and error["type"] == "error"
    assert error["error"]["type"] == "api_error" and rid in error["error"]["message"]
    assert count(app_client, "/v1/messages", "500") == 1


@pytest.mark.parametrize(("path", "body"), [("/v1/responses", RESPONSES), ("/v1/messages", MESSAGES)])
def test_failure_before_the_first_token_is_a_real_error(
    app_client: TestClient, loader: Loader, path: str, body: dict[str, Any]
) -> None:
    loader.script.fail_at = 0
    r = app_client.post(path, json={**body, "stream": True})
    assert r.status_code == 500
    if path == "/v1/messages":
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
        assert r.headers["request-id"] in r.json()["error"]["message"]
    else:
        assert_openai_error(r, 500, code="engine_error")
    assert count(app_client, path, "500") == 1


def test_queue_timeout_is_overloaded_529_on_messages(tmp_path: Path, loader: Loader) -> None:
    """One slot, busy: a queued request times out; Anthropic's shape says overloaded (529),
    OpenAI's says 503."""
    loader.script.loop_forever = True
    settings = fake_settings(tmp_path, parallel=1, queue_timeout_s=0.3)
    with TestClient(create_app(settings, engine_loader=loader)) as c:
        assert wait_health(c) == 200
        stop, running = threading.Event(), threading.Event()

        def hog() -> None:
            with c.stream("POST", "/v1/chat/completions",
                          json={"model": "fake-chat", "messages": [{"role": "user", "content": "x"}],
                                "max_tokens": 200, "stream": True}) as r:
                for _ in r.iter_lines():
                    running.set()
                    if stop.is_set():
                        break

        loader.script.step_delay = 0.05
        t = threading.Thread(target=hog)
        t.start()
        try:
            assert running.wait(20)  # the one slot is taken
            m = c.post("/v1/messages", json=MESSAGES)
            assert m.status_code == 529, m.text
            assert m.json()["error"]["type"] == "overloaded_error"
            assert_openai_error(c.post("/v1/responses", json=RESPONSES), 503, code="queue_timeout")
        finally:
            stop.set()
            t.join(30)


# --- the hot path: spliced delta frames equal the typed events -----------------------------------


def _generation(gid: str) -> Any:
    from foundry_local_py.engines.base import GenerationRequest
    from foundry_local_py.generation import Generation, ValidRequest
    from foundry_local_py.generation.prompt import NO_TOOLS

    valid = ValidRequest(None, GenerationRequest(gid, [1, 2, 3], 16), NO_TOOLS)  # type: ignore[arg-type]
    return Generation(gid, model=None, requests=[valid], handles=[])  # type: ignore[arg-type]


TRICKY = ["Hello", ', "quoted" \\ back', "\n", "naïve ✓ 😀", "</tool_call>", "\x00"]


def test_responses_delta_frames_equal_the_typed_event() -> None:
    from foundry_local_py.protocol.responses import OutputTextDeltaEvent, ResponseCreateRequest
    from foundry_local_py.scheduler.scheduler import TextEvent
    from foundry_local_py.server.adapters.responses import ResponsesCall, ResponsesFrontEnd

    call = ResponsesCall(wire=ResponseCreateRequest(model="m", input="hi"))
    fe = ResponsesFrontEnd(call, _generation("resp-1"))
    fe.stream_start()
    first = fe.stream_text(0, TextEvent(TRICKY[0], 1, 0.0))
    assert first is not None and first.endswith(fe._send(OutputTextDeltaEvent(
        sequence_number=4, item_id=fe.msg_id, output_index=0, content_index=0, delta=TRICKY[0])))
    for text in TRICKY[1:]:
        seq = fe.seq
        assert fe.stream_text(0, TextEvent(text, 1, 0.0)) == fe._send(OutputTextDeltaEvent(
            sequence_number=seq, item_id=fe.msg_id, output_index=0, content_index=0, delta=text))


def test_messages_delta_frames_equal_the_typed_event() -> None:
    from foundry_local_py.protocol.anthropic import ContentBlockDeltaEvent, MessagesRequest, TextDelta
    from foundry_local_py.scheduler.scheduler import TextEvent
    from foundry_local_py.server.adapters.messages import MessagesFrontEnd

    req = MessagesRequest.model_validate(MESSAGES)
    fe = MessagesFrontEnd(req, _generation("msg-1"))
    fe.stream_start()
    first = fe.stream_text(0, TextEvent(TRICKY[0], 1, 0.0))
    assert first is not None and first.endswith(
        fe._send(ContentBlockDeltaEvent(index=0, delta=TextDelta(text=TRICKY[0]))))
    for text in TRICKY[1:]:
        assert fe.stream_text(0, TextEvent(text, 1, 0.0)) == fe._send(
            ContentBlockDeltaEvent(index=0, delta=TextDelta(text=text)))
