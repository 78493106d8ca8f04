"""The streaming hot path builds text-only chunks by hand: they must equal the model-built ones."""

from __future__ import annotations

import json

import pytest

from foundry_local_py.protocol.chat import ChatCompletionChunk, ChoiceDelta, ChunkChoice
from foundry_local_py.protocol.completions import Completion, CompletionChoice
from foundry_local_py.server.serving import FastChunk, chunk_json, frame

TEXTS = ["hello", " world", "", "quote \" and \\ backslash", "naïve 🌊 漢字", "\n\t", "\x00TEXT", "</s>"]


@pytest.mark.parametrize("text", TEXTS)
def test_chat_fast_chunk_equals_model_dump(text: str) -> None:
    def build(content: str) -> ChatCompletionChunk:
        return ChatCompletionChunk(id="chatcmpl-1", created=7, model="m\"odel",
                                   choices=[ChunkChoice(index=0, delta=ChoiceDelta(content=content))])

    fast = FastChunk(build("\x00TEXT\x00"))
    assert fast.event(text) == frame(chunk_json(build(text)))
    payload = json.loads(fast.event(text)[len(b"data: "):])
    assert payload["choices"][0]["delta"]["content"] == text
    assert payload["choices"][0]["finish_reason"] is None


@pytest.mark.parametrize("text", TEXTS)
def test_completion_fast_chunk_equals_model_dump(text: str) -> None:
    def build(t: str) -> Completion:
        return Completion(id="cmpl-1", created=7, model="m",
                          choices=[CompletionChoice(index=2, text=t, finish_reason=None)])

    assert FastChunk(build("\x00TEXT\x00")).event(text) == frame(chunk_json(build(text)))
