"""SIGTERM (checklist 19): the server stops admitting, lets a running stream finish, and exits 0."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.serving import chat_body

pytestmark = pytest.mark.slow


def test_sigterm_drains_running_stream_and_exits(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory()
    client = httpx.Client(timeout=120)
    with client.stream(
        "POST",
        proc.url("/v1/chat/completions"),
        json=chat_body("Tell me a long story.", max_tokens=200, stream=True),
    ) as r:
        lines = r.iter_lines()
        first = [next(lines) for _ in range(4)]
        proc.terminate()
        # no new connections once shutdown has begun
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(proc.url("/health"), timeout=2)
            except httpx.TransportError:  # refused, or dropped unanswered while shutting down
                break
            time.sleep(0.05)
        else:
            pytest.fail("still accepting connections 10 s after SIGTERM")
        rest = [ln for ln in [*first, *lines] if ln]
    assert rest[-1] == "data: [DONE]", rest[-3:]
    chunks = [json.loads(ln[len("data: ") :]) for ln in rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert not any("error" in c for c in chunks)
    rc = proc.proc.wait(90)
    assert rc == 0, proc.log()[-2000:]
