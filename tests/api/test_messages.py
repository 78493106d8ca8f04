"""POST /v1/messages and /v1/messages/count_tokens through the official anthropic client, on the
real SmolLM2 model: text, system prompts, streaming (text_stream and the final message), forced
tool_use with valid JSON input, tool_result round trips, stop sequences, count_tokens ==
usage.input_tokens, and bad input in Anthropic's error shape and statuses."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import jsonschema
import openai
import pytest

from tests.conftest import ServerFactory
from tests.support.serving import SMOLLM, assert_no_leaks, poll, scrape

pytestmark = pytest.mark.slow

P = "foundry_local_"
GREEDY = {"temperature": 0}  # the client's create() no longer lists sampling fields: sent as extra body
QUESTION = "What is the capital of France?"
USER = [{"role": "user", "content": QUESTION}]
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def _claude(base_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def det_claude(det_base_url: str) -> anthropic.Anthropic:
    """On the deterministic-mode server, for tests comparing two requests' greedy tokens."""
    return _claude(det_base_url)


@pytest.fixture(scope="module")
def claude(base_url: str) -> anthropic.Anthropic:
    return _claude(base_url)


def assert_anthropic_error(r: httpx.Response, status: int, type_: str) -> str:
    assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
    body = r.json()
    assert set(body) == {"type", "error"} and body["type"] == "error", body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == type_, body
    assert body["error"]["message"]
    assert r.headers.get("request-id", "").startswith("req_")
    assert_no_leaks(r.text)
    return str(body["error"]["message"])


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in raw.decode("utf-8").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if lines:
            name = next((ln[7:] for ln in lines if ln.startswith("event: ")), None)
            data = [ln[6:] for ln in lines if ln.startswith("data: ")]
            assert len(data) == 1, block
            out.append((name, json.loads(data[0])))
    return out


def _text(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# --- generation ---------------------------------------------------------------------------------


def test_create_equals_chat_completions(det_claude: anthropic.Anthropic, det_client: openai.OpenAI) -> None:
    claude, client = det_claude, det_client  # two requests' greedy tokens compared
    m = claude.messages.create(model=SMOLLM, max_tokens=24, messages=USER, extra_body=GREEDY)
    chat = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=24, temperature=0)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg")
    assert m.model == SMOLLM
    assert [b.type for b in m.content] == ["text"]
    assert _text(m) == chat.choices[0].message.content
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert (m.stop_reason == "max_tokens") == (chat.choices[0].finish_reason == "length")
    assert chat.usage is not None
    assert m.usage.input_tokens == chat.usage.prompt_tokens
    assert m.usage.output_tokens == chat.usage.completion_tokens


def test_system_prompt_string_and_blocks(det_claude: anthropic.Anthropic, det_client: openai.OpenAI) -> None:
    claude, client = det_claude, det_client  # two requests' greedy tokens compared
    system = "You are a pirate. Answer in one short sentence."
    as_text = claude.messages.create(model=SMOLLM, max_tokens=20, system=system, messages=USER,
                                     extra_body=GREEDY)
    as_blocks = claude.messages.create(model=SMOLLM, max_tokens=20, messages=USER,
                                       system=[{"type": "text", "text": system}], extra_body=GREEDY)
    chat = client.chat.completions.create(
        model=SMOLLM, max_tokens=20, temperature=0,
        messages=[{"role": "system", "content": system}, *USER])
    assert _text(as_text) == _text(as_blocks) == chat.choices[0].message.content
    assert chat.usage is not None and as_text.usage.input_tokens == chat.usage.prompt_tokens


def test_stop_sequences(claude: anthropic.Anthropic) -> None:
    free = claude.messages.create(model=SMOLLM, max_tokens=30, messages=USER, extra_body=GREEDY)
    text = _text(free)
    words = text.split()
    assert len(words) >= 3, text
    stop = words[2]
    m = claude.messages.create(model=SMOLLM, max_tokens=30, messages=USER, stop_sequences=[stop],
                               extra_body=GREEDY)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop
    assert _text(m) == text[: text.index(stop)]


def test_stream_text_and_final_message(claude: anthropic.Anthropic) -> None:
    full = claude.messages.create(model=SMOLLM, max_tokens=40, messages=USER, extra_body=GREEDY)
    with claude.messages.stream(model=SMOLLM, max_tokens=40, messages=USER, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == _text(full) == _text(final)
    assert final.stop_reason == full.stop_reason
    assert final.usage.input_tokens == full.usage.input_tokens
    assert final.usage.output_tokens == full.usage.output_tokens


def test_stream_raw_event_order(http: httpx.Client) -> None:
    body = {"model": SMOLLM, "max_tokens": 8, "messages": USER, "stream": True, "temperature": 0}
    r = http.post("/v1/messages", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert all(name == data["type"] for name, data in events)
    types = [t for _, t in ((n, d["type"]) for n, d in events)]
    n_deltas = types.count("content_block_delta")
    assert n_deltas >= 1
    assert types == ["message_start", "ping", "content_block_start", *["content_block_delta"] * n_deltas,
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["input_tokens"] > 0
    assert events[2][1] == {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}}
    assert all(d["delta"]["type"] == "text_delta" for _, d in events if d["type"] == "content_block_delta")
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 8


def _forced(claude: anthropic.Anthropic, **extra: Any) -> Any:
    return claude.messages.create(
        model=SMOLLM, max_tokens=64, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], extra_body=GREEDY, **extra)


def test_forced_tool_use_has_valid_json_input(claude: anthropic.Anthropic) -> None:
    m = _forced(claude)
    assert m.stop_reason == "tool_use"
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1
    use = uses[0]
    assert use.name == "get_weather" and use.id
    assert isinstance(use.input, dict)
    jsonschema.validate(use.input, WEATHER["input_schema"])


def test_any_tool_choice_and_streamed_tool_use(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(
        model=SMOLLM, max_tokens=64, tools=[WEATHER], tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "What is the weather in Rome?"}], extra_body=GREEDY,
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    use = next(b for b in final.content if b.type == "tool_use")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)


def test_tool_result_round_trip(claude: anthropic.Anthropic) -> None:
    """tool_use back in the assistant turn, tool_result in the user turn: a text answer, and the
    result is in the prompt (count_tokens grows with it and equals usage.input_tokens)."""
    first = _forced(claude)
    use = next(b for b in first.content if b.type == "tool_use")
    answers = []
    results = ("22 degrees and sunny.", "22 degrees and sunny, with a light breeze from the west all day.")
    for result in results:
        messages: list[Any] = [
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name,
                                               "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]},
        ]
        m = claude.messages.create(model=SMOLLM, max_tokens=40, tools=[WEATHER], messages=messages,
                                   extra_body=GREEDY)
        assert m.stop_reason in ("end_turn", "max_tokens"), m.content
        assert [b.type for b in m.content] == ["text"] and _text(m)
        counted = claude.messages.count_tokens(model=SMOLLM, tools=[WEATHER], messages=messages)
        assert counted.input_tokens == m.usage.input_tokens
        answers.append(m)
    assert answers[1].usage.input_tokens > answers[0].usage.input_tokens


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"messages": USER},
        {"messages": USER, "system": "Be brief."},
        {"messages": [*USER, {"role": "assistant", "content": "Paris."},
                      {"role": "user", "content": "Sure?"}]},
        {"messages": USER, "tools": [WEATHER]},
        {"messages": USER, "tools": [WEATHER], "tool_choice": {"type": "none"}},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                   {"type": "text", "text": "b"}]}]},
    ],
)
def test_count_tokens_equals_usage(claude: anthropic.Anthropic, request_kwargs: dict[str, Any]) -> None:
    counted = claude.messages.count_tokens(model=SMOLLM, **request_kwargs)
    m = claude.messages.create(model=SMOLLM, max_tokens=2, extra_body=GREEDY, **request_kwargs)
    assert counted.input_tokens == m.usage.input_tokens > 0


def test_counted_under_its_endpoint(base_url: str, http: httpx.Client) -> None:
    def count(status: str) -> float:
        return scrape(base_url).get(P + "requests_total", endpoint="/v1/messages", status=status)

    ok, bad = count("200"), count("400")
    body = {"model": SMOLLM, "max_tokens": 2, "messages": USER}
    assert http.post("/v1/messages", json=body).status_code == 200
    assert http.post("/v1/messages", json={"model": SMOLLM, "messages": USER}).status_code == 400
    assert poll(lambda: count("200") == ok + 1 and count("400") == bad + 1, 5)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "nobody", "is_error": True,
                                       "content": [{"type": "text", "text": "boom"}]}]}],
        [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"},
                                      {"type": "text", "text": "?"}]}],
        [{"role": "user", "content": ""}],
        [{"role": "assistant",
          "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [1]}}]},
         {"role": "user", "content": "and?"}],
    ],
)
def test_odd_but_valid_messages_are_served(http: httpx.Client, messages: list[dict[str, Any]]) -> None:
    r = http.post("/v1/messages", json={"model": SMOLLM, "max_tokens": 2, "messages": messages})
    assert r.status_code == 200, r.text
    counted = http.post("/v1/messages/count_tokens", json={"model": SMOLLM, "messages": messages})
    assert counted.json()["input_tokens"] == r.json()["usage"]["input_tokens"]


def test_disconnect_is_499_and_frees_the_slot(base_url: str) -> None:
    def count() -> float:
        return scrape(base_url).get(P + "requests_total", model=SMOLLM, endpoint="/v1/messages",
                                    status="499")

    before = count()
    story = [{"role": "user", "content": "Write a long story."}]
    body = {"model": SMOLLM, "max_tokens": 2000, "messages": story}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/messages", json=body, timeout=httpx.Timeout(60, read=1.5))
    assert poll(lambda: count() == before + 1
                and scrape(base_url).get(P + "requests_running", model=SMOLLM) == 0, 5)


# --- bad input ----------------------------------------------------------------------------------


def test_missing_max_tokens_through_the_client(claude: anthropic.Anthropic) -> None:
    """The client's create() insists on max_tokens itself; its raw post does not."""
    missing: dict[str, Any] = {"model": SMOLLM, "messages": USER}
    for body in (missing, {**missing, "max_tokens": None}):
        with pytest.raises(anthropic.BadRequestError) as info:
            claude.post("/v1/messages", body=body, cast_to=anthropic.types.Message)
        assert info.value.status_code == 400
        err = info.value.body
        assert isinstance(err, dict) and err["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in err["error"]["message"]


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"model": SMOLLM, "messages": USER}, "max_tokens"),
        ({"model": SMOLLM, "max_tokens": 0, "messages": USER}, "max_tokens"),
        ({"model": SMOLLM, "max_tokens": 5}, "messages"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": []}, "messages"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
         "messages[0].role"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
         "messages[0].content"),
        ({"model": SMOLLM, "max_tokens": 5,
          "messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64"}}]}]},
         "messages[0].content[0].type"),
        ({"model": SMOLLM, "max_tokens": 5,
          "messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
         "messages[0].content[0].tool_use_id"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": USER,
          "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": USER, "tools": [WEATHER],
          "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": USER, "temperature": 1.5}, "temperature"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": USER, "stop_sequences": ["a", "b", "c", "d", "e"]},
         "stop_sequences"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": USER, "thinking": {"type": "enabled",
                                                                           "budget_tokens": 1024}},
         "thinking"),
        ({"model": SMOLLM, "max_tokens": 5, "messages": [*USER, {"role": "assistant", "content": "The"}]},
         "prefill"),
        ({"model": SMOLLM, "max_tokens": 5,
          "messages": [{"role": "user",
                        "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]},
         "messages[0].content[0].type"),
    ],
)
def test_bad_input_in_anthropic_shape(http: httpx.Client, body: dict[str, Any], mentions: str) -> None:
    message = assert_anthropic_error(http.post("/v1/messages", json=body), 400, "invalid_request_error")
    assert mentions in message


def test_not_found_and_oversized(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json={"model": "no-such-model", "max_tokens": 5, "messages": USER})
    assert_anthropic_error(r, 404, "not_found_error")
    n_ctx = http.get(f"/v1/models/{SMOLLM}").json()["context_length"]
    huge = [{"role": "user", "content": "word " * (n_ctx + 500)}]
    message = assert_anthropic_error(http.post("/v1/messages", json={"model": SMOLLM, "max_tokens": 5,
                                                                     "messages": huge}),
                                     400, "invalid_request_error")
    assert "context length" in message
    r = http.post("/v1/messages/count_tokens", json={"model": SMOLLM, "messages": huge})
    assert r.status_code == 200 and r.json()["input_tokens"] > n_ctx  # counting never refuses
    assert_anthropic_error(http.post("/v1/messages", content=b"{nope"), 400, "invalid_request_error")
    assert_anthropic_error(http.post("/v1/messages/count_tokens", json={"model": SMOLLM}), 400,
                           "invalid_request_error")
    # the server still serves
    small = {"model": SMOLLM, "max_tokens": 2, "messages": USER}
    assert http.post("/v1/messages", json=small).status_code == 200


def test_max_tokens_beyond_the_context_is_capped(server_factory: ServerFactory) -> None:
    """Clients send a large fixed max_tokens: it is not refused; generation stops at the context.
    (A server with a short context keeps the prompt that fills it short.)"""
    small_ctx = server_factory("--n-ctx", "512")
    claude = anthropic.Anthropic(base_url=small_ctx.base_url, api_key="x", max_retries=0, timeout=120)
    n_ctx = httpx.get(small_ctx.url(f"/v1/models/{SMOLLM}")).json()["context_length"]
    assert n_ctx == 512
    intro = "Write a very long story about a dragon, a knight and a wizard. Never stop. "
    pad = "The dragon flew over the mountains and the rivers and the forests. "
    base = claude.messages.count_tokens(model=SMOLLM,
                                        messages=[{"role": "user", "content": intro}]).input_tokens
    per = claude.messages.count_tokens(
        model=SMOLLM, messages=[{"role": "user", "content": intro + pad}]).input_tokens - base
    content = intro + pad * ((n_ctx - base - 24) // per)
    messages = [{"role": "user", "content": content}]
    room = n_ctx - claude.messages.count_tokens(model=SMOLLM, messages=messages).input_tokens
    assert 0 < room < 60
    m = claude.messages.create(model=SMOLLM, max_tokens=32_000, messages=messages, extra_body=GREEDY)
    assert m.usage.input_tokens + m.usage.output_tokens <= n_ctx
    assert m.stop_reason in ("model_context_window_exceeded", "end_turn")
    assert (m.stop_reason == "model_context_window_exceeded") == (m.usage.output_tokens == room)
    small = claude.messages.create(model=SMOLLM, max_tokens=3, messages=messages, extra_body=GREEDY)
    assert small.stop_reason == "max_tokens" and small.usage.output_tokens == 3


def test_x_api_key_and_bearer(server_factory: ServerFactory) -> None:
    keyed = server_factory("--api-key", "sk-local")
    good = anthropic.Anthropic(base_url=keyed.base_url, api_key="sk-local", max_retries=0, timeout=120)
    m = good.messages.create(model=SMOLLM, max_tokens=4, messages=USER)
    assert m.content
    assert good.messages.count_tokens(model=SMOLLM, messages=USER).input_tokens > 0
    bad = anthropic.Anthropic(base_url=keyed.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        bad.messages.create(model=SMOLLM, max_tokens=4, messages=USER)
    assert isinstance(info.value.body, dict) and info.value.body["error"]["type"] == "authentication_error"
    # the OpenAI client's Bearer works on the same server, and x-api-key on OpenAI routes too
    oa = openai.OpenAI(base_url=keyed.url("/v1"), api_key="sk-local", max_retries=0)
    assert oa.responses.create(model=SMOLLM, input="Hi", max_output_tokens=2).output
    assert httpx.get(keyed.url("/v1/models"), headers={"x-api-key": "sk-local"}).status_code == 200
