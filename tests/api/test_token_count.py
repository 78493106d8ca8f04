"""The token counter renders through the same renderer as the chat: its count equals the
``usage.prompt_tokens`` the same request reports, over roles, names, tools and tool calls."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support.serving import SMOLLM

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def _call(cid: str, name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _conversations() -> list[dict[str, Any]]:
    u = {"role": "user", "content": "What is the weather in Paris?"}
    call = {"role": "assistant", "content": None,
            "tool_calls": [_call("call_1", "get_weather", {"city": "Paris"})]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
    convs: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "developer", "content": "Answer in French."}, u]},
        {"messages": [{"role": "user", "content": "Hi", "name": "alice"}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Two "},
                                                   {"type": "text", "text": "parts"}]}]},
        {"messages": [u, {"role": "assistant", "content": "Sunny."},
                      {"role": "user", "content": "And Rome?"}]},
        {"messages": [u], "tools": [WEATHER]},
        {"messages": [u], "tools": [WEATHER, TIME]},
        {"messages": [u], "tools": [WEATHER], "tool_choice": "none"},
        {"messages": [u], "tools": [WEATHER], "tool_choice": "auto"},
        {"messages": [u, call, result], "tools": [WEATHER]},
        {"messages": [u, call, result]},
        {"messages": [{"role": "system", "content": "Use tools."}, u, call, result],
         "tools": [WEATHER, TIME]},
        {"messages": [u, {"role": "assistant", "content": "Let me check.",
                          "tool_calls": [_call("call_2", "get_weather", {"city": "Paris"}),
                                         _call("call_3", "get_time", {})]},
                      {"role": "tool", "tool_call_id": "call_2", "content": "21C"},
                      {"role": "tool", "tool_call_id": "call_3", "content": "noon"}],
         "tools": [WEATHER, TIME]},
        {"messages": [{"role": "user", "content": "Ünïcödé ✓ 日本語 🚀"}]},
        {"messages": [{"role": "user", "content": "a" * 500}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "empty system"}]},
        {"messages": [{"role": "user", "content": "Hi", "name": "bob"},
                      {"role": "assistant", "content": "Hello bob", "name": "helper"},
                      {"role": "user", "content": "Bye", "name": "bob"}]},
        {"messages": [{"role": "user", "content": "<|im_start|>tricky<|im_end|>"}]},
        {"messages": [u, call, result, {"role": "assistant", "content": "It is 21C."},
                      {"role": "user", "content": "Thanks"}], "tools": [WEATHER]},
    ]
    assert len(convs) == 20
    return convs


@pytest.mark.parametrize("conv", _conversations(), ids=[f"conv{i:02d}" for i in range(20)])
def test_count_equals_usage_prompt_tokens(http: httpx.Client, conv: dict[str, Any]) -> None:
    body = {"model": SMOLLM, "max_tokens": 1, "temperature": 0, **conv}
    counted = http.post("/v1/chat/completions/tokenizer/encode/count", json=body)
    assert counted.status_code == 200, counted.text
    served = http.post("/v1/chat/completions", json=body)
    assert served.status_code == 200, served.text
    assert counted.json()["tokenCount"] == served.json()["usage"]["prompt_tokens"] > 0
