"""SIGTERM (checklist 19, issue 13): the server stops admitting (new requests 503, ``/health`` says
``draining``), lets running streams finish within the drain timeout, ends those that would run
longer with ``finish_reason`` set, and exits 0; a second SIGTERM exits at once."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from foundry_local_py.server.transport import FORCED_EXIT_CODE
from tests.support.serving import assert_openai_error, chat_body

pytestmark = pytest.mark.slow


class Stream(threading.Thread):
    """One streamed chat read to the end; records its chunks and how it ended."""

    def __init__(self, url: str, max_tokens: int, started: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.url, self.max_tokens, self.started = url, max_tokens, started
        self.lines: list[str] = []
        self.error: str | None = None

    def run(self) -> None:
        body = chat_body("Tell me a long story about a dragon.", max_tokens=self.max_tokens, stream=True,
                         temperature=0.7, seed=len(self.name))
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=120) as r:
                lines = r.iter_lines()
                self.lines.append(next(lines))
                self.started.wait(60)
                self.lines.extend(ln for ln in lines if ln)
        except (httpx.HTTPError, threading.BrokenBarrierError) as exc:
            self.error = repr(exc)

    def chunks(self) -> list[dict[str, Any]]:
        assert self.error is None, self.error
        assert self.lines[-1] == "data: [DONE]", self.lines[-3:]
        return [json.loads(ln[len("data: "):]) for ln in self.lines[:-1] if ln.startswith("data: ")]


def _start_streams(url: str, n: int, max_tokens: int) -> list[Stream]:
    barrier = threading.Barrier(n + 1)
    streams = [Stream(url, max_tokens, barrier) for _ in range(n)]
    for s in streams:
        s.start()
    barrier.wait(120)  # every stream has its first chunk: all 8 are running
    time.sleep(0.3)
    return streams


def test_sigterm_with_8_streams_drains_then_ends_the_rest_and_exits_0(server_factory) -> None:  # type: ignore[no-untyped-def]
    drain_s = 4.0
    proc = server_factory("--parallel", "8", "--drain-timeout", str(drain_s))
    streams = _start_streams(proc.base_url, 8, max_tokens=2000)
    sent = time.monotonic()
    proc.terminate()
    time.sleep(0.3)
    # draining: still listening, but no new work; /health says so
    health = httpx.get(proc.url("/health"), timeout=5)
    assert health.status_code == 503 and health.json()["status"] == "draining", health.text
    r = httpx.post(proc.url("/v1/chat/completions"), json=chat_body(max_tokens=2), timeout=10)
    err = assert_openai_error(r, 503, code="shutting_down")
    assert "shutting down" in err["message"]
    assert r.headers.get("retry-after")
    assert httpx.get(proc.url("/v1/models"), timeout=5).status_code == 503
    for s in streams:
        s.join(60)
    rc = proc.proc.wait(60)
    took = time.monotonic() - sent
    assert rc == 0, proc.log()[-2000:]
    for s in streams:
        chunks = s.chunks()
        assert not any("error" in c for c in chunks), chunks[-2:]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop"), chunks[-1]
    reasons = [s.chunks()[-1]["choices"][0]["finish_reason"] for s in streams]
    print(f"\nDRAIN 8 streams, drain timeout {drain_s} s: exit 0 after {took:.2f} s; "
          f"finish reasons {reasons}")
    # none could finish 2000 tokens in the drain time: they were ended at the drain timeout
    assert drain_s - 0.5 < took < drain_s + 20, took


def test_streams_that_fit_in_the_drain_timeout_finish_whole(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--parallel", "8", "--drain-timeout", "120")
    streams = _start_streams(proc.base_url, 8, max_tokens=40)
    proc.terminate()
    for s in streams:
        s.join(120)
    assert proc.proc.wait(120) == 0, proc.log()[-2000:]
    for s in streams:
        chunks = s.chunks()
        tokens = sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content"))
        reason = chunks[-1]["choices"][0]["finish_reason"]
        assert reason == "stop" or (reason == "length" and tokens >= 20), (reason, tokens)


def test_a_second_sigterm_exits_at_once(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--parallel", "8", "--drain-timeout", "120")
    streams = _start_streams(proc.base_url, 2, max_tokens=2000)
    proc.terminate()
    time.sleep(0.5)
    assert httpx.get(proc.url("/health"), timeout=5).json()["status"] == "draining"
    sent = time.monotonic()
    proc.terminate()
    rc = proc.proc.wait(10)
    assert time.monotonic() - sent < 3
    assert rc == FORCED_EXIT_CODE, rc
    for s in streams:
        s.join(10)
        assert not s.is_alive()
