"""Every sampling field on every engine, on the real models: the field changes the output as its
name says, or the request is a 400 naming it. Driven by the backends' declared capabilities, so a
new engine or field is checked without touching this file (only ``HONOURED`` gains a check).

SmolLM2-135M on llama.cpp (GGUF) and onnxruntime-genai (converted int8 ONNX), one server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from foundry_local_py.engines.backends import BACKENDS, SAMPLING_FIELDS
from tests.integration.conftest import GGUF, ONNX
from tests.support.serving import ServerProcess, assert_openai_error

pytestmark = [pytest.mark.slow, pytest.mark.onnx]

FORMATS = {GGUF: "gguf", ONNX: "onnx"}
POEM = [{"role": "user", "content": "Write a short poem about the sea."}]
REPEAT = [{"role": "user", "content": "Say the word cat ten times: cat cat cat"}]
HOT = {"temperature": 1.5, "seed": 7}


@pytest.fixture(params=[GGUF, ONNX], ids=["llama.cpp", "onnxruntime-genai"])
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Chat = Callable[..., dict[str, Any]]


@pytest.fixture
def chat(parity_server: ServerProcess, model: str) -> Chat:
    def run(messages: list[dict[str, str]] = POEM, **fields: Any) -> dict[str, Any]:
        body = {"model": model, "messages": messages, "max_tokens": 24, **fields}
        r = httpx.post(parity_server.url("/v1/chat/completions"), json=body, timeout=300)
        assert r.status_code == 200, r.text
        return dict(r.json())

    return run


def _text(body: dict[str, Any]) -> str:
    return str(body["choices"][0]["message"]["content"])


def _greedy(chat: Chat, messages: list[dict[str, str]] = POEM) -> str:
    return _text(chat(messages, temperature=0))


def _temperature(chat: Chat) -> None:
    assert _text(chat(**HOT)) != _greedy(chat), "temperature 1.5 gave the greedy text"


def _narrows_to_greedy(field: str, value: Any) -> Callable[[Chat], None]:
    """At a high temperature, this field's extreme value leaves only the most likely token."""

    def check(chat: Chat) -> None:
        greedy = _greedy(chat)
        assert _text(chat(**HOT)) != greedy
        assert _text(chat(**HOT, **{field: value})) == greedy

    return check


def _seed(chat: Chat) -> None:
    a, b = _text(chat(temperature=1.5, seed=1)), _text(chat(temperature=1.5, seed=1))
    assert a == b, "the same seed gave different text"
    assert _text(chat(temperature=1.5, seed=2)) != a, "another seed gave the same text"


def _penalises_repeats(field: str, value: float) -> Callable[[Chat], None]:
    """On a prompt that invites repetition, the penalty cuts the repeats."""

    def check(chat: Chat) -> None:
        greedy = _greedy(chat, REPEAT)
        assert greedy.lower().count("cat") >= 3, greedy
        penalised = _text(chat(REPEAT, temperature=0, **{field: value}))
        assert penalised.lower().count("cat") < greedy.lower().count("cat"), (greedy, penalised)

    return check


def _repeated_words(text: str) -> int:
    words = text.lower().split()
    return len(words) - len(set(words))


def _presence(chat: Chat) -> None:
    """A flat penalty on every token already seen: it cannot outweigh a very confident choice
    ("cat cat cat" stays), so on a free text it must change the words and repeat fewer of them."""
    greedy = _greedy(chat)
    penalised = _text(chat(temperature=0, presence_penalty=2.0))
    assert penalised != greedy
    assert _repeated_words(penalised) <= _repeated_words(greedy), (greedy, penalised)


def _logit_bias(chat: Chat) -> None:
    body = chat(temperature=0, logit_bias={"28": 100}, logprobs=True)
    tokens = [t["token"] for t in body["choices"][0]["logprobs"]["content"]]
    assert len(tokens) > 1 and len(set(tokens)) == 1, tokens  # every token is the boosted one
    assert _text(body) != _greedy(chat)


HONOURED: dict[str, Callable[[Chat], None]] = {
    "temperature": _temperature,
    "top_p": _narrows_to_greedy("top_p", 0.0),
    "top_k": _narrows_to_greedy("top_k", 1),
    "min_p": _narrows_to_greedy("min_p", 1.0),
    "seed": _seed,
    "presence_penalty": _presence,
    "frequency_penalty": _penalises_repeats("frequency_penalty", 2.0),
    "repeat_penalty": _penalises_repeats("repeat_penalty", 1.8),
    "logit_bias": _logit_bias,
}
REFUSED_VALUE: dict[str, Any] = {
    "temperature": 0.5, "top_p": 0.5, "top_k": 5, "min_p": 0.3, "seed": 4, "presence_penalty": 1.0,
    "frequency_penalty": 1.0, "repeat_penalty": 1.3, "logit_bias": {"28": 5},
}


def test_every_field_has_a_check() -> None:
    assert set(HONOURED) == set(REFUSED_VALUE) == set(SAMPLING_FIELDS)


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_sampling_field_is_honoured_or_refused(
    parity_server: ServerProcess, model: str, chat: Chat, field: str
) -> None:
    caps = BACKENDS[FORMATS[model]].capabilities
    if field in caps.sampling:
        HONOURED[field](chat)
        return
    body = {"model": model, "messages": POEM, "max_tokens": 4, field: REFUSED_VALUE[field]}
    r = httpx.post(parity_server.url("/v1/chat/completions"), json=body, timeout=300)
    err = assert_openai_error(r, 400, param=field)
    assert field in err["message"]


def test_logprobs_are_honoured_or_refused(parity_server: ServerProcess, model: str, chat: Chat) -> None:
    if BACKENDS[FORMATS[model]].capabilities.logprobs:
        content = chat(temperature=0, logprobs=True, top_logprobs=2)["choices"][0]["logprobs"]["content"]
        assert content and all(len(t["top_logprobs"]) == 2 for t in content)
        return
    body = {"model": model, "messages": POEM, "max_tokens": 4, "logprobs": True}
    r = httpx.post(parity_server.url("/v1/chat/completions"), json=body, timeout=300)
    assert_openai_error(r, 400, param="logprobs")
