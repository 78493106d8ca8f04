"""engines.chat_format: tool prompts, forced-call constraints and parsing replies into tool calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from foundry_local_py.engines.base import ChatTemplateSpec
from foundry_local_py.engines.chat_format import (
    ChatFormatter,
    ToolSpec,
    could_become_tool_call,
    parse_tool_calls,
    tool_call_constraint,
)

WEATHER = ToolSpec(
    "get_weather",
    "Weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = ToolSpec("get_time", None, {"type": "object", "properties": {"tz": {"type": "string"}}})
TOOLS = [WEATHER, TIME]


def test_tagged_call() -> None:
    content, calls = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', TOOLS
    )
    assert content is None
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_")


def test_bare_json_call_and_parameters_alias() -> None:
    content, calls = parse_tool_calls(' {"name": "get_time", "parameters": {"tz": "UTC"}} ', TOOLS)
    assert content is None and calls[0].name == "get_time"
    assert json.loads(calls[0].arguments) == {"tz": "UTC"}


def test_several_calls_and_surrounding_text() -> None:
    text = (
        'Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"CET\\"}"}</tool_call>'
    )
    content, calls = parse_tool_calls(text, TOOLS)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {"tz": "CET"}  # string arguments are decoded
    assert len({c.id for c in calls}) == 2


def test_unclosed_tag_at_the_end() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": {}}', TOOLS)
    assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # unknown function
        '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "get_time", "arguments": "{bad"}</tool_call>',
        "<tool_call>not json</tool_call>",
        '{"name": "get_time"',
        '{"answer": 42}',
        "Just text.",
        "",
    ],
)
def test_non_calls_stay_content(text: str) -> None:
    content, calls = parse_tool_calls(text, TOOLS)
    assert calls == []
    assert content == text


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("", True),
        ("  ", True),
        ("{", True),
        ('{"name"', True),
        ("<", True),
        ("<tool", True),
        ("<tool_call>", True),
        ("<tool_call>{", True),
        ("Hello", False),
        ("<b>", False),
        ("The", False),
    ],
)
def test_could_become_tool_call(prefix: str, expected: bool) -> None:
    assert could_become_tool_call(prefix) is expected


def test_forced_call_constraint_schema() -> None:
    one = tool_call_constraint([WEATHER])
    assert one.kind == "json_schema" and one.schema is not None
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Rome"}}, one.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {}}, one.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_weather", "arguments": {}}, one.schema)  # city is required
    both = tool_call_constraint(TOOLS)
    assert both.schema is not None
    jsonschema.validate({"name": "get_time", "arguments": {"tz": "UTC"}}, both.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "other", "arguments": {}}, both.schema)


PLAIN = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
NATIVE = (
    "{% if tools %}TOOLS={{ tools|tojson }};{% endif %}{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
    "{{ c.function.arguments|tojson }}{% endfor %}{% else %}{{ m.content }}{% endif %}{% endfor %}"
)


def test_plain_template_gets_a_tool_prompt_and_written_back_calls() -> None:
    f = ChatFormatter(ChatTemplateSpec(PLAIN))
    assert not f.native_tools
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
        {"role": "developer", "content": "Answer in French."},
    ]
    out = f.render(messages, tools=TOOLS)
    assert out.startswith("<system>Be brief.\n\nYou can call functions.")
    assert '"name": "get_weather"' in out and '"name": "get_time"' in out
    assert (
        '<assistant><tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call></assistant>'
        in out
    )
    assert "<tool><tool_response>\nSunny\n</tool_response></tool>" in out
    assert "<system>Answer in French.</system>" in out  # developer -> system
    assert out.endswith("<assistant>")
    no_tools = f.render(messages[:2])
    assert "You can call functions" not in no_tools


def test_native_template_receives_tools() -> None:
    f = ChatFormatter(ChatTemplateSpec(NATIVE))
    assert f.native_tools
    out = f.render(
        [
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
        ],
        tools=[WEATHER],
    )
    assert out.startswith('TOOLS=[{"type": "function", "function": {"name": "get_weather"')
    assert 'CALL get_weather {"city": "Oslo"}' in out  # arguments decoded for the template
