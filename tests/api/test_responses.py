"""POST/GET/DELETE /v1/responses through the official openai client and the OpenAI Agents SDK, on
the real SmolLM2 model: text, instructions, structured output, forced function calls and tool
round trips, the streaming events and their accumulator, stored responses (retrieve, input_items,
delete, previous_response_id across a restart), bad input in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import ServerFactory
from tests.support.serving import SMOLLM, assert_openai_error, poll, scrape

pytestmark = pytest.mark.slow

P = "foundry_local_"
QUESTION = "What is the capital of France?"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def sse_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    """(event name, data) of each event of an SSE body whose events may carry an ``event:`` line."""
    out: list[tuple[str | None, dict[str, Any]]] = []
    for block in raw.decode("utf-8").replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln and not ln.startswith(":")]
        if not lines:
            continue
        name = next((ln[len("event: "):] for ln in lines if ln.startswith("event: ")), None)
        data = [ln[len("data: "):] for ln in lines if ln.startswith("data: ")]
        assert len(data) == 1, block
        out.append((name, json.loads(data[0])))
    return out


# --- generation ---------------------------------------------------------------------------------


def test_text_equals_chat_completions(det_client: openai.OpenAI) -> None:
    """Same conversation, same renderer, greedy: the Responses API and chat completions agree."""
    client = det_client  # compares two requests' greedy tokens (tests/conftest.py: det_server)
    r = client.responses.create(model=SMOLLM, input=QUESTION, max_output_tokens=24, temperature=0)
    chat = client.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=24, temperature=0)
    assert r.object == "response" and r.id.startswith("resp")
    assert r.model == SMOLLM
    assert r.status in ("completed", "incomplete")
    assert [item.type for item in r.output] == ["message"]
    assert r.output[0].role == "assistant"
    assert r.output_text and r.output_text == chat.choices[0].message.content
    assert r.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_instructions_are_the_system_message(det_client: openai.OpenAI) -> None:
    client = det_client  # compares two requests' greedy tokens (tests/conftest.py: det_server)
    system = "You are a pirate. Answer in one short sentence."
    r = client.responses.create(model=SMOLLM, instructions=system, input=QUESTION, max_output_tokens=24,
                                temperature=0)
    chat = client.chat.completions.create(
        model=SMOLLM, messages=[{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
        max_tokens=24, temperature=0)
    plain = client.responses.create(model=SMOLLM, input=QUESTION, max_output_tokens=24, temperature=0)
    assert r.instructions == system
    assert r.output_text == chat.choices[0].message.content
    assert r.usage is not None and plain.usage is not None and chat.usage is not None
    assert r.usage.input_tokens == chat.usage.prompt_tokens != plain.usage.input_tokens


def test_incomplete_at_max_output_tokens(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SMOLLM, input="Write a long story about dragons.", max_output_tokens=5,
                                temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 5
    assert r.output[0].status == "incomplete"


def test_json_schema_output(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=SMOLLM, input="Invent a person with a name and an age, as JSON.", max_output_tokens=120,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON_SCHEMA, "strict": True}},
    )
    data = json.loads(r.output_text)
    jsonschema.validate(data, PERSON_SCHEMA)
    assert r.text is not None and r.text.format is not None and r.text.format.type == "json_schema"


def test_json_object_output(client: openai.OpenAI) -> None:
    r = client.responses.create(model=SMOLLM, input='Return {"ok": true} as JSON.', max_output_tokens=48,
                                temperature=0, text={"format": {"type": "json_object"}})
    assert r.status == "completed"
    assert isinstance(json.loads(r.output_text), dict)


def _forced_call(client: openai.OpenAI, **extra: Any) -> Any:
    return client.responses.create(
        model=SMOLLM, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64, temperature=0, **extra)


def test_forced_function_call(client: openai.OpenAI) -> None:
    r = _forced_call(client)
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    args = json.loads(call.arguments)
    jsonschema.validate(args, WEATHER_TOOL["parameters"])
    assert r.status == "completed"


def test_required_tool_choice_calls_a_tool(client: openai.OpenAI) -> None:
    other = {**WEATHER_TOOL, "name": "get_time", "description": "Get the time in a city."}
    tools: Any = [WEATHER_TOOL, other]
    r = client.responses.create(model=SMOLLM, input="What is the weather in Rome?", tools=tools,
                                tool_choice="required", max_output_tokens=64, temperature=0)
    assert [item.type for item in r.output] == ["function_call"]
    assert r.output[0].name in ("get_weather", "get_time")


def test_tool_round_trip_with_function_call_output(client: openai.OpenAI) -> None:
    """The call comes back as a function_call item with its function_call_output: the model
    answers in text, and the tool's result is part of its prompt (the input grows by it)."""
    first = _forced_call(client, store=False)
    call = next(item for item in first.output if item.type == "function_call")
    convo: list[Any] = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
    ]
    outputs = ["It is 22 degrees and sunny in Paris.",
               "It is 22 degrees and sunny in Paris. A light breeze blows from the west all day long."]
    answers = []
    for result in outputs:
        r = client.responses.create(
            model=SMOLLM, tools=[WEATHER_TOOL], max_output_tokens=40, temperature=0,
            input=[*convo, {"type": "function_call_output", "call_id": call.call_id, "output": result}])
        assert [item.type for item in r.output] == ["message"], r.output
        assert r.output_text
        answers.append(r)
    assert answers[0].usage is not None and answers[1].usage is not None
    assert answers[1].usage.input_tokens > answers[0].usage.input_tokens


def test_tool_round_trip_via_previous_response_id(client: openai.OpenAI) -> None:
    """Only the function_call_output is sent: the rest comes from the stored response, and the
    prefix cache serves the earlier turn's tokens."""
    first = _forced_call(client)
    call = next(item for item in first.output if item.type == "function_call")
    r = client.responses.create(
        model=SMOLLM, previous_response_id=first.id, tools=[WEATHER_TOOL], max_output_tokens=40,
        temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22 C, sunny"}])
    assert r.previous_response_id == first.id
    assert [item.type for item in r.output] == ["message"] and r.output_text
    assert first.usage is not None and r.usage is not None
    assert r.usage.input_tokens > first.usage.input_tokens
    assert r.usage.input_tokens_details.cached_tokens > 0


# --- streaming ----------------------------------------------------------------------------------


def test_stream_accumulator_equals_non_stream(det_client: openai.OpenAI) -> None:
    client = det_client  # compares two requests' greedy tokens (tests/conftest.py: det_server)
    kwargs: dict[str, Any] = {"model": SMOLLM, "input": "Say hi.", "max_output_tokens": 200, "temperature": 0}
    full = client.responses.create(**kwargs)
    assert full.status == "completed"
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == full.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == full.output_text
    assert final.usage is not None and full.usage is not None
    assert final.usage.input_tokens == full.usage.input_tokens
    assert final.usage.output_tokens == full.usage.output_tokens
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas >= 2
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    assert events[0].response.status == "in_progress" and events[-1].response.status == "completed"


def test_stream_forced_function_call(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=SMOLLM, input="What is the weather in Paris?", tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=64, temperature=0,
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed",
    ]
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    done = events[4]
    assert done.type == "response.function_call_arguments.done" and done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER_TOOL["parameters"])


def test_stream_incomplete_and_raw_framing(http: httpx.Client) -> None:
    """Raw SSE: each event named after its type, sequence numbers in order, incomplete at the end."""
    body = {"model": SMOLLM, "input": "Write a long story.", "max_output_tokens": 4, "stream": True,
            "temperature": 0}
    r = http.post("/v1/responses", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    last = events[-1][1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 4


# --- stored responses ---------------------------------------------------------------------------


def test_retrieve_input_items_delete(client: openai.OpenAI) -> None:
    first = client.responses.create(model=SMOLLM, input="Say hello.", max_output_tokens=12, temperature=0,
                                    metadata={"purpose": "test"})
    got = client.responses.retrieve(first.id)
    assert got.id == first.id and got.output_text == first.output_text and got.metadata == {"purpose": "test"}
    assert got.usage is not None and first.usage is not None
    assert got.usage.input_tokens == first.usage.input_tokens

    items = client.responses.input_items.list(first.id)
    assert [(i.type, i.role) for i in items.data] == [("message", "user")]
    assert items.data[0].content[0].type == "input_text" and items.data[0].content[0].text == "Say hello."

    second = client.responses.create(model=SMOLLM, input="Say it again.", previous_response_id=first.id,
                                     max_output_tokens=12, temperature=0)
    listed = client.responses.input_items.list(second.id, order="asc")
    kinds = [(i.type, getattr(i, "role", None)) for i in listed.data]
    assert kinds == [("message", "user"), ("message", "assistant"), ("message", "user")]
    assert listed.data[1].id == first.output[0].id
    newest = client.responses.input_items.list(second.id, limit=1)  # default order: newest first
    assert [i.id for i in newest.data] == [listed.data[-1].id] and newest.has_more

    deleted = client.with_options(max_retries=0).responses.delete(first.id)
    assert deleted is None  # the client discards the body ({"id", "object", "deleted": true})
    for call in (lambda: client.responses.retrieve(first.id), lambda: client.responses.delete(first.id),
                 lambda: client.responses.input_items.list(first.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    # the follow-up holds its whole conversation: deleting the first response does not break it
    third = client.responses.create(model=SMOLLM, input="Once more.", previous_response_id=second.id,
                                    max_output_tokens=8, temperature=0)
    assert third.output_text


def test_concurrent_requests_store_and_continue(client: openai.OpenAI) -> None:
    """Eight conversations at once (batched together): each is stored and each continues from its
    own turn (the store's writes are serialised off the event loop)."""
    from concurrent.futures import ThreadPoolExecutor

    def converse(i: int) -> tuple[str, str]:
        first = client.responses.create(model=SMOLLM, input=f"Remember the number {i}.", max_output_tokens=6,
                                        temperature=0)
        follow = client.responses.create(model=SMOLLM, input="Which number?", previous_response_id=first.id,
                                         max_output_tokens=6, temperature=0)
        return first.id, follow.id

    with ThreadPoolExecutor(8) as pool:
        pairs = list(pool.map(converse, range(8)))
    for i, (first_id, follow_id) in enumerate(pairs):
        items = client.responses.input_items.list(follow_id, order="asc").data
        assert items[0].content[0].text == f"Remember the number {i}."
        assert items[-1].content[0].text == "Which number?"
        assert client.responses.retrieve(first_id).id == first_id


def test_store_false_is_not_kept(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.responses.create(model=SMOLLM, input="Hi", max_output_tokens=4, store=False)
    assert r.store is False
    assert_openai_error(http.get(f"/v1/responses/{r.id}"), 404, code="not_found")
    bad = http.post("/v1/responses", json={"model": SMOLLM, "input": "x", "previous_response_id": r.id})
    assert_openai_error(bad, 404, code="previous_response_not_found", param="previous_response_id")


def test_raw_delete_body(http: httpx.Client) -> None:
    r = http.post("/v1/responses", json={"model": SMOLLM, "input": "Hi", "max_output_tokens": 2})
    rid = r.json()["id"]
    d = http.delete(f"/v1/responses/{rid}")
    assert d.status_code == 200 and d.json() == {"id": rid, "object": "response", "deleted": True}
    assert_openai_error(http.delete(f"/v1/responses/{rid}"), 404, code="not_found")


def test_previous_response_id_across_restart(server_factory: ServerFactory, tmp_path: Path) -> None:
    cache = tmp_path / "restart-cache"
    first_server = server_factory(cache_dir=cache)
    c1 = openai.OpenAI(base_url=first_server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    first = c1.responses.create(model=SMOLLM, input="My name is Ada. Remember it.", max_output_tokens=16,
                                temperature=0)
    assert first_server.stop() == 0

    second_server = server_factory(cache_dir=cache)
    c2 = openai.OpenAI(base_url=second_server.url("/v1"), api_key="x", max_retries=0, timeout=120)
    assert c2.responses.retrieve(first.id).output_text == first.output_text
    follow = c2.responses.create(model=SMOLLM, input="What is my name?", previous_response_id=first.id,
                                 max_output_tokens=16, temperature=0)
    assert follow.output_text
    items = c2.responses.input_items.list(follow.id, order="asc")
    texts = [part.text for item in items.data for part in item.content]
    assert texts[0] == "My name is Ada. Remember it." and texts[1] == first.output_text
    assert texts[2] == "What is my name?"


def test_input_tokens_equals_usage(client: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": SMOLLM, "instructions": "Be brief.", "tools": [WEATHER_TOOL],
                              "input": [{"role": "user", "content": "Weather in Oslo?"}]}
    counted = client.responses.input_tokens.count(**kwargs)
    r = client.responses.create(**kwargs, max_output_tokens=8, temperature=0)
    assert r.usage is not None and counted.input_tokens == r.usage.input_tokens


# --- the OpenAI Agents SDK ----------------------------------------------------------------------


def test_agents_sdk_tool_loop(base_url: str) -> None:
    """An Agent with a function tool, run by Runner.run over the Responses API: the tool is
    called (forced, so the tiny model is deterministic), its result goes back, a final answer
    comes out."""
    from agents import Agent, ModelSettings, Runner, function_tool, set_tracing_disabled
    from agents.items import ToolCallItem, ToolCallOutputItem
    from agents.models.openai_responses import OpenAIResponsesModel

    set_tracing_disabled(True)
    calls: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        calls.append(city)
        return f"It is 22 degrees and sunny in {city}."

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=120)
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather in one sentence.",
        tools=[get_weather],
        model=OpenAIResponsesModel(model=SMOLLM, openai_client=client),
        # The call is forced; after it the SDK resets tool_choice, and the second turn offers no
        # tool (tool_use_behavior keeps the loop going, reset_tool_choice lets it end).
        model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=48),
    )

    async def run() -> Any:
        try:
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(run())
    assert len(calls) >= 1 and all(isinstance(c, str) and c for c in calls)
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds and ToolCallOutputItem in kinds
    assert isinstance(result.final_output, str) and result.final_output.strip()
    outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert "22 degrees" in str(outputs[0].output)


def test_models_list_the_routes_each_model_answers(http: httpx.Client) -> None:
    cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
    assert cards[SMOLLM]["endpoints"] == ["/v1/chat/completions", "/v1/completions", "/v1/responses",
                                          "/v1/messages", "/v1/embeddings"]
    assert http.get(f"/v1/models/{SMOLLM}").json()["endpoints"] == cards[SMOLLM]["endpoints"]
    for card in cards.values():
        assert ("/v1/responses" in card["endpoints"]) == ("/v1/chat/completions" in card["endpoints"])


# --- metrics ------------------------------------------------------------------------------------


def test_counted_under_its_endpoint(base_url: str, http: httpx.Client) -> None:
    def count(status: str) -> float:
        return scrape(base_url).get(P + "requests_total", endpoint="/v1/responses", status=status)

    ok, bad = count("200"), count("400")
    small = {"model": SMOLLM, "input": "Hi", "max_output_tokens": 2}
    assert http.post("/v1/responses", json=small).status_code == 200
    assert http.post("/v1/responses", json={"model": SMOLLM, "input": 5}).status_code == 400
    assert poll(lambda: count("200") == ok + 1 and count("400") == bad + 1, 5)


def test_stream_disconnect_is_499(base_url: str) -> None:
    def count() -> float:
        return scrape(base_url).get(P + "requests_total", model=SMOLLM, endpoint="/v1/responses",
                                    status="499")

    before = count()
    body = {"model": SMOLLM, "input": "Write a very long story about dragons.", "max_output_tokens": 2000,
            "stream": True}
    with httpx.Client(base_url=base_url, timeout=60) as c, c.stream("POST", "/v1/responses", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(12):
            next(lines)
    assert poll(lambda: count() == before + 1
                and scrape(base_url).get(P + "requests_running", model=SMOLLM) == 0, 5)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "model", "missing_required_parameter"),
        ({"model": SMOLLM}, "input", "missing_required_parameter"),
        ({"model": SMOLLM, "input": 5}, "input", "invalid_value"),
        ({"model": SMOLLM, "input": ""}, "input", "invalid_value"),
        ({"model": SMOLLM, "input": [5]}, "input[0]", "invalid_value"),
        ({"model": SMOLLM, "input": [{"type": "message", "content": "x"}]}, "input[0].role",
         "missing_required_parameter"),
        ({"model": SMOLLM, "input": [{"role": "wizard", "content": "x"}]}, "input[0].role", "invalid_value"),
        ({"model": SMOLLM, "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
         "input[0].call_id", "missing_required_parameter"),
        ({"model": SMOLLM, "input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id",
         "missing_required_parameter"),
        ({"model": SMOLLM, "input": [{"role": "user", "content": [{"type": "input_image",
                                                                    "image_url": "x"}]}]},
         "input[0].content[0].type", "invalid_value"),
        ({"model": SMOLLM, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
         "input[0].content[0].type", "invalid_value"),
        ({"model": SMOLLM, "input": [{"type": "reasoning", "summary": []}]}, "input[0].type",
         "invalid_value"),
        ({"model": SMOLLM, "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type",
         "invalid_value"),
        ({"model": SMOLLM, "input": "x", "tools": [WEATHER_TOOL],
          "tool_choice": {"type": "function", "name": "nope"}},
         "tool_choice", "invalid_value"),
        ({"model": SMOLLM, "input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
        ({"model": SMOLLM, "input": "x", "temperature": 3}, "temperature", "invalid_value"),
        ({"model": SMOLLM, "input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}},
         "text.format.schema", "missing_required_parameter"),
        ({"model": SMOLLM, "input": "x", "truncation": "auto"}, "truncation", None),
        ({"model": SMOLLM, "input": "x", "background": True}, "background", "invalid_value"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    http: httpx.Client, body: dict[str, Any], param: str, code: str | None
) -> None:
    err = assert_openai_error(http.post("/v1/responses", json=body), 400, param=param,
                              type_="invalid_request_error", code=code)
    if "input_image" in json.dumps(body):
        assert "input_image" in err["message"] and "text-only" in err["message"]


@pytest.mark.parametrize(
    "items",
    [
        [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "not json"},
         {"type": "function_call_output", "call_id": "c1", "output": "done"}],
        [{"type": "function_call_output", "call_id": "nobody-called", "output": [{"type": "input_text",
                                                                                  "text": "orphan"}]}],
        [{"role": "developer", "content": "Be brief."},
         {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
         {"role": "user", "content": [{"type": "output_text", "text": "odd part", "annotations": []}]}],
        [{"role": "user", "content": []}],
    ],
)
def test_odd_but_valid_items_are_served(http: httpx.Client, items: list[dict[str, Any]]) -> None:
    r = http.post("/v1/responses", json={"model": SMOLLM, "input": items, "max_output_tokens": 2})
    assert r.status_code == 200, r.text


def test_unknown_ids_and_models(http: httpx.Client) -> None:
    assert_openai_error(http.get("/v1/responses/resp-nope"), 404, code="not_found")
    assert_openai_error(http.get("/v1/responses/resp-nope/input_items"), 404, code="not_found")
    assert_openai_error(http.delete("/v1/responses/resp-nope"), 404, code="not_found")
    r = http.post("/v1/responses", json={"model": SMOLLM, "input": "x", "previous_response_id": "resp-nope"})
    assert_openai_error(r, 404, code="previous_response_not_found", param="previous_response_id")
    assert_openai_error(http.post("/v1/responses", json={"model": "no-such-model", "input": "x"}), 404,
                        code="model_not_found")
    assert_openai_error(http.get("/v1/responses/x/input_items", params={"limit": 0}), 400, param="limit")
    assert_openai_error(http.post("/v1/responses", content=b"{nope"), 400, code="invalid_json")


def test_oversized_input_and_budget(http: httpx.Client) -> None:
    n_ctx = http.get(f"/v1/models/{SMOLLM}").json()["context_length"]
    huge = "word " * (n_ctx + 500)
    r = http.post("/v1/responses", json={"model": SMOLLM, "input": huge})
    assert_openai_error(r, 400, code="context_length_exceeded", param="input")
    r = http.post("/v1/responses", json={"model": SMOLLM, "input": "hi", "max_output_tokens": 100_000})
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="max_output_tokens")
    assert "max_output_tokens" in err["message"]
    # the server still serves
    small = {"model": SMOLLM, "input": "hi", "max_output_tokens": 2}
    assert http.post("/v1/responses", json=small).status_code == 200
