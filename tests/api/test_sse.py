"""SSE framing and UTF-8 safety of streams, read as raw bytes (httpx, no client library)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.serving import SMOLLM, chat_body, sse_json

pytestmark = pytest.mark.slow

EMOJI_PROMPT = "Reply with three emoji and the Japanese word for cat: 猫 😀🎉"


def _stream(http: httpx.Client, path: str, body: dict[str, object]) -> tuple[httpx.Response, bytes]:
    with http.stream("POST", path, json=body) as r:
        raw = b"".join(r.iter_raw())
    return r, raw


def test_chat_stream_framing(http: httpx.Client) -> None:
    r, raw = _stream(http, "/v1/chat/completions", chat_body("Hello!", max_tokens=8, stream=True))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-request-id"].startswith("req_")
    chunks = sse_json(raw)  # checks: one data line per event, blank-line separated, one final [DONE]
    assert len(chunks) >= 3
    first, last = chunks[0], chunks[-1]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["id"] == first["id"] and c["model"] == SMOLLM and isinstance(c["created"], int)
        assert len(c["choices"]) == 1
        assert "finish_reason" in c["choices"][0]  # present (null) on every chunk, as OpenAI sends it
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_completion_stream_framing(http: httpx.Client) -> None:
    body = {
        "model": SMOLLM,
        "prompt": ["Hello", "Bye"],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r, raw = _stream(http, "/v1/completions", body)
    assert r.status_code == 200
    chunks = sse_json(raw)
    assert all(c["object"] == "text_completion" for c in chunks)
    finished = {c["choices"][0]["index"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_multibyte_characters_split_across_tokens(http: httpx.Client, path: str) -> None:
    """Emoji take several byte-level tokens in SmolLM2; the stream still carries whole characters only."""
    if path == "/v1/chat/completions":
        body = chat_body(EMOJI_PROMPT, max_tokens=40, logprobs=True)
    else:
        body = {
            "model": SMOLLM,
            "prompt": "Emoji: 😀🎉🐱, Japanese: 猫 犬 鳥, more emoji:",
            "max_tokens": 40,
            "temperature": 0,
            "logprobs": 0,
        }
    full = http.post(path, json=body).json()
    if path == "/v1/chat/completions":
        pieces = [bytes(e["bytes"]) for e in full["choices"][0]["logprobs"]["content"]]
        text = full["choices"][0]["message"]["content"]
    else:
        pieces = [
            t.encode("utf-8", errors="surrogateescape") for t in full["choices"][0]["logprobs"]["tokens"]
        ]
        text = full["choices"][0]["text"]

    def broken(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    if path == "/v1/chat/completions":
        assert any(broken(p) for p in pieces), "the probe produced no character split across tokens"
    assert any(ord(ch) > 0x7FF for ch in text), f"no multi-byte output to check: {text!r}"
    _, raw = _stream(http, path, {**body, "stream": True})
    chunks = sse_json(raw)  # strict UTF-8 decode of the whole body
    if path == "/v1/chat/completions":
        deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks]
    else:
        deltas = [c["choices"][0]["text"] for c in chunks]
    for d in deltas:
        assert "\ufffd" not in d, f"replacement character in a delta: {d!r}"
        d.encode("utf-8")  # no lone surrogates
    assert "".join(deltas) == text
