"""POST /v1/chat/completions through the official openai client, on the real SmolLM2 model."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.support.serving import SMOLLM

pytestmark = pytest.mark.slow

USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_non_stream_shape_and_usage(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=12, temperature=0)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == SMOLLM
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens > 0
    assert 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_matches_non_stream(client: openai.OpenAI) -> None:
    """Greedy: the streamed deltas concatenate to the non-streamed content."""
    full = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=16, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason
    assert all(f is None for f in finishes[:-1])
    assert all(c.usage is None for c in chunks), "usage chunk sent without include_usage"


def test_stream_include_usage(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=SMOLLM,
            messages=USER,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.model_dump(
        include={"prompt_tokens", "completion_tokens", "total_tokens"}
    ) == full.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"})
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_token_limit_fields(client: openai.OpenAI, field: str) -> None:
    r = client.chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        temperature=0,
        **{field: 5},
    )
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_max_completion_tokens_wins_over_max_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOLLM,
        messages=[{"role": "user", "content": "Tell me a story."}],
        temperature=0,
        max_tokens=9,
        max_completion_tokens=3,
    )
    assert r.usage.completion_tokens == 3


COUNT = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["4", ["zzz", "4"]])
def test_stop_string_or_list(client: openai.OpenAI, stop: str | list[str], stream: bool) -> None:
    base = client.chat.completions.create(model=SMOLLM, messages=COUNT, max_tokens=24, temperature=0)
    text = base.choices[0].message.content
    assert "4" in text, f"the probe needs a '4' in the greedy output: {text!r}"
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=SMOLLM, messages=COUNT, max_tokens=24, temperature=0, stop=stop, stream=True
            )
        )
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(
            model=SMOLLM, messages=COUNT, max_tokens=24, temperature=0, stop=stop
        )
        got, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == text[: text.index("4")]
    assert finish == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]

    def run(seed: int) -> str:
        r = client.chat.completions.create(
            model=SMOLLM, messages=msgs, max_tokens=16, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    first = run(1234)
    assert run(1234) == first
    assert any(run(s) != first for s in (1, 2, 3)), "different seeds always gave the same sample"


def test_tiny_top_p_is_greedy(client: openai.OpenAI) -> None:
    """top_p is applied: a nucleus of one token at temperature 1 reproduces the greedy output."""
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    greedy = client.chat.completions.create(model=SMOLLM, messages=msgs, max_tokens=16, temperature=0)
    nucleus = client.chat.completions.create(
        model=SMOLLM, messages=msgs, max_tokens=16, temperature=1.0, top_p=0.001, seed=99
    )
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content


def test_penalties_are_applied(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=SMOLLM, messages=COUNT, max_tokens=24, temperature=0)
    penalised = client.chat.completions.create(
        model=SMOLLM, messages=COUNT, max_tokens=24, temperature=0, frequency_penalty=2.0
    )
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    r = client.chat.completions.create(
        model=SMOLLM, messages=COUNT, max_tokens=4, temperature=0, presence_penalty=-1.5
    )
    assert r.choices[0].message.content


def test_all_roles_in_a_conversation(client: openai.OpenAI) -> None:
    """system / user / assistant (with a tool call) / tool messages all reach the prompt."""
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    short = [{"role": "user", "content": "What is the weather in Paris?"}]
    conversation = [
        {"role": "system", "content": "You are a terse assistant."},
        *short,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 C"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "Thanks. And tomorrow?"},
    ]
    a = client.chat.completions.create(model=SMOLLM, messages=short, max_tokens=4, temperature=0, tools=tools)
    b = client.chat.completions.create(
        model=SMOLLM, messages=conversation, max_tokens=4, temperature=0, tools=tools
    )
    assert b.usage.prompt_tokens > a.usage.prompt_tokens + 20
    assert b.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # developer is accepted as a system message
    c = client.chat.completions.create(
        model=SMOLLM,
        max_tokens=4,
        temperature=0,
        messages=[{"role": "developer", "content": "Be brief."}, *short],
    )
    assert c.usage.prompt_tokens > 0


def test_content_parts_are_text(client: openai.OpenAI) -> None:
    parts = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is the capital "},
                {"type": "text", "text": "of France?"},
            ],
        }
    ]
    a = client.chat.completions.create(model=SMOLLM, messages=parts, max_tokens=8, temperature=0)
    b = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=8, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


# --- structured output --------------------------------------------------------------------------


def test_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOLLM,
        max_tokens=48,
        temperature=0,
        response_format={"type": "json_object"},
        messages=[{"role": "user", "content": 'Return {"ok": true} as JSON.'}],
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(
        model=SMOLLM,
        max_tokens=64,
        temperature=0,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, "strict": True},
        },
    )
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(**kwargs)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


def test_json_schema_changes_the_output(client: openai.OpenAI) -> None:
    """The grammar really constrains: the same prompt without it is not JSON."""
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    free = client.chat.completions.create(model=SMOLLM, messages=msgs, max_tokens=24, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


# --- tools --------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a timezone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_call(call: object, name: str, params: dict[str, object]) -> None:
    assert call.type == "function"  # type: ignore[attr-defined]
    assert call.id.startswith("call_")  # type: ignore[attr-defined]
    assert call.function.name == name  # type: ignore[attr-defined]
    jsonschema.validate(json.loads(call.function.arguments), params)  # type: ignore[attr-defined]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_call(client: openai.OpenAI, choice: object) -> None:
    r = client.chat.completions.create(
        model=SMOLLM, messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER, TIME], tool_choice=choice
    )
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    assert c.message.content is None
    assert c.message.tool_calls and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    if isinstance(choice, dict):
        _check_call(call, "get_time", TIME["function"]["parameters"])
    else:
        assert call.function.name in ("get_weather", "get_time")
        spec = WEATHER if call.function.name == "get_weather" else TIME
        _check_call(call, call.function.name, spec["function"]["parameters"])
    assert r.usage.completion_tokens > 0


def test_forced_tool_call_streamed(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=SMOLLM,
            messages=ASK,
            max_tokens=48,
            temperature=0,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls, "no tool_calls delta"
    assert calls[0].index == 0 and calls[0].id and calls[0].function.name == "get_weather"
    args = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(args), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_choice_none_and_auto(client: openai.OpenAI) -> None:
    none = client.chat.completions.create(
        model=SMOLLM, messages=ASK, max_tokens=8, temperature=0, tools=[WEATHER], tool_choice="none"
    )
    auto = client.chat.completions.create(
        model=SMOLLM, messages=ASK, max_tokens=8, temperature=0, tools=[WEATHER], tool_choice="auto"
    )
    bare = client.chat.completions.create(model=SMOLLM, messages=ASK, max_tokens=8, temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].finish_reason in ("stop", "length")
    # 'none' leaves the tools out of the prompt; 'auto' describes them.
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens
    assert auto.usage.prompt_tokens > bare.usage.prompt_tokens + 20
    a = auto.choices[0]
    if a.message.tool_calls:
        assert a.finish_reason == "tool_calls"
        _check_call(a.message.tool_calls[0], "get_weather", WEATHER["function"]["parameters"])
    else:
        assert a.message.content and a.finish_reason in ("stop", "length")


def test_tool_call_round_trip(client: openai.OpenAI) -> None:
    """A forced call, its result sent back as a tool message, then a normal answer."""
    first = client.chat.completions.create(
        model=SMOLLM, messages=ASK, max_tokens=48, temperature=0, tools=[WEATHER], tool_choice="required"
    )
    call = first.choices[0].message.tool_calls[0]
    follow = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 25 C"},
    ]
    second = client.chat.completions.create(
        model=SMOLLM, messages=follow, max_tokens=16, temperature=0, tools=[WEATHER], tool_choice="none"
    )
    bare = client.chat.completions.create(model=SMOLLM, messages=ASK, max_tokens=1, temperature=0)
    assert second.choices[0].message.content
    assert second.choices[0].message.tool_calls is None
    assert second.usage.prompt_tokens > bare.usage.prompt_tokens + 10  # the call and its result


# --- logprobs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs(client: openai.OpenAI, stream: bool) -> None:
    kwargs = dict(model=SMOLLM, messages=USER, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kwargs))
        entries = [
            e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        entries = r.choices[0].logprobs.content
        text = r.choices[0].message.content
        assert len(entries) == r.usage.completion_tokens
    assert entries
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8") == text
    for e in entries:
        assert e.logprob <= 0.0
        assert len(e.top_logprobs) == 3
        lps = [t.logprob for t in e.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        # greedy: the chosen token is the most likely one
        assert e.top_logprobs[0].token == e.token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)


def test_logprobs_without_top(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=SMOLLM, messages=USER, max_tokens=4, temperature=0, logprobs=True
    )
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    assert all(e.top_logprobs == [] for e in entries)
    r = client.chat.completions.create(model=SMOLLM, messages=USER, max_tokens=4, temperature=0)
    assert r.choices[0].logprobs is None
