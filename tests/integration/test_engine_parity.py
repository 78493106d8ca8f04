"""The same OpenAI-client requests against both engines, on one real server.

SmolLM2-135M as llama.cpp GGUF (Q4_1, shipped) and as onnxruntime-genai ONNX (int8, built from that
GGUF by the conversion pipeline once per session); the request names the variant, the server
loads the right engine. Outputs must be coherent and behave the same way (stream equals non-stream,
stops, limits, structured output, tools); only logprobs are refused by the ONNX engine.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import GGUF, ONNX
from tests.support.serving import ServerProcess, scrape

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

ENGINES = {GGUF: "llama.cpp", ONNX: "onnxruntime-genai"}
COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white", "pink")


@pytest.fixture(params=[GGUF, ONNX], ids=["llama.cpp", "onnxruntime-genai"])
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ask(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_requests_load_the_engine_of_the_named_variant(oai: openai.OpenAI, parity_server: ServerProcess,
                                                       model: str) -> None:
    oai.chat.completions.create(model=model, messages=ask("Hi"), max_tokens=2)  # type: ignore[arg-type]
    card = httpx.get(parity_server.url(f"/v1/models/{model}")).json()
    assert card["loaded"] is True and card["engine"] == ENGINES[model]
    entries = {m["name"]: m for m in httpx.get(parity_server.url("/openai/loadedmodels")).json()}
    assert entries[model]["engine"] == ENGINES[model]
    assert scrape(parity_server.base_url).get("foundry_local_model_loaded", engine=ENGINES[model]) >= 1
    if model == ONNX:  # the load-time batch verdict is kept for `model info` (issue 17)
        from typer.testing import CliRunner

        from foundry_local_py.cli.main import app

        batching = entries[model]["batching"]
        assert isinstance(batching, bool)
        assert bool(entries[model]["batchingReason"]) == (not batching)  # why not, in words
        slots = {m["id"]: m for m in httpx.get(parity_server.url("/v1/slots")).json()["data"]}
        assert slots[model]["batching"] == batching
        assert slots[model]["batching_reason"] == entries[model]["batchingReason"]
        result = CliRunner().invoke(app, ["model", "info", model],
                                    env={"FOUNDRY_LOCAL_CACHE": str(parity_server.cache_dir)})
        assert result.exit_code == 0, result.output
        expected = "batched, outputs do not depend" if batching else "one sequence at a time"
        assert f"batching of {model}: {expected}" in " ".join(result.output.split()), result.output


def test_chat_is_coherent_and_stream_equals_non_stream(oai: openai.OpenAI, model: str) -> None:
    messages = ask("Name three colors.")
    full = oai.chat.completions.create(model=model, messages=messages, max_tokens=40,  # type: ignore[arg-type]
                                       temperature=0)
    text = full.choices[0].message.content or ""
    assert any(c in text.lower() for c in COLORS), text
    assert full.usage is not None and full.usage.completion_tokens > 0
    stream = oai.chat.completions.create(model=model, messages=messages, max_tokens=40,  # type: ignore[arg-type]
                                         temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == text
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens
    assert finish == full.choices[0].finish_reason


def test_limits_and_stops(oai: openai.OpenAI, model: str) -> None:
    r = oai.chat.completions.create(model=model, messages=ask("Write a poem about the sea."),  # type: ignore[arg-type]
                                    max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage is not None
    assert r.usage.completion_tokens == 5
    r = oai.chat.completions.create(model=model, messages=ask("List five fruits, one per line."),  # type: ignore[arg-type]
                                    max_tokens=60, temperature=0, stop=["\n"])
    assert "\n" not in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop"


def test_json_schema_output_validates(oai: openai.OpenAI, model: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = oai.chat.completions.create(
        model=model, messages=ask("Make up a person with a name and an age."),  # type: ignore[arg-type]
        max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
    )
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), schema)


def test_forced_tool_call(oai: openai.OpenAI, model: str) -> None:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }}]
    r = oai.chat.completions.create(model=model, messages=ask("What's the weather in Paris?"),  # type: ignore[arg-type]
                                    tools=tools, tool_choice="required", max_tokens=60, temperature=0)  # type: ignore[arg-type]
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments)["city"], str)  # type: ignore[union-attr]


def test_completions_endpoint(oai: openai.OpenAI, model: str) -> None:
    r = oai.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage is not None and r.usage.completion_tokens > 0


def test_logprobs_supported_or_refused_cleanly(oai: openai.OpenAI, model: str) -> None:
    if model == GGUF:
        r = oai.chat.completions.create(model=model, messages=ask("Hi"), max_tokens=3,  # type: ignore[arg-type]
                                        logprobs=True, top_logprobs=2)
        assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
    else:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=model, messages=ask("Hi"), max_tokens=3,  # type: ignore[arg-type]
                                        logprobs=True)
        assert err.value.body["param"] == "logprobs"  # type: ignore[index]
