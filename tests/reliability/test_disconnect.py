"""A client that goes away stops its generation and frees its place (checklist 16).

"Stopped" is read from the server itself: foundry_local_requests_running (the scheduler's active
sequences) drops to 0 although the request asked for 2000 tokens, and the request is counted with
status 499. The issue's bound is 1 s; the poll bound here adds slack for a loaded test machine.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.serving import SMOLLM, chat_body, poll, scrape

pytestmark = pytest.mark.slow

STOP_BOUND_S = 3.0  # the issue says 1 s; generous for a shared 2-core machine (see the report)
P = "foundry_local_"


def _running(base_url: str) -> float:
    return scrape(base_url).get(P + "requests_running", model=SMOLLM)


def _count_499(base_url: str, endpoint: str) -> float:
    return scrape(base_url).get(P + "requests_total", model=SMOLLM, endpoint=endpoint, status="499")


def _wait_stopped(base_url: str, endpoint: str, before_499: float) -> float:
    t0 = time.monotonic()
    ok = poll(
        lambda: _running(base_url) == 0 and _count_499(base_url, endpoint) == before_499 + 1,
        STOP_BOUND_S,
        interval=0.01,
    )
    elapsed = time.monotonic() - t0
    assert ok, f"still running {elapsed:.2f}s after the disconnect"
    return elapsed


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            chat_body("Write a very long story about dragons.", max_tokens=2000, stream=True),
        ),
        (
            "/v1/completions",
            {
                "model": SMOLLM,
                "prompt": "Once upon a time",
                "max_tokens": 2000,
                "temperature": 0,
                "stream": True,
            },
        ),
    ],
)
def test_stream_disconnect_stops_generation(
    base_url: str, path: str, body: dict[str, object], record_property: pytest.RecordProperty
) -> None:
    before = _count_499(base_url, path)
    with httpx.Client(base_url=base_url, timeout=60) as c:
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for _ in range(10):
                next(lines)
            assert _running(base_url) == 1
        # leaving the block closed the connection mid-stream
    record_property("stop_seconds", _wait_stopped(base_url, path, before))
    # the place is free: a new request is served at once
    assert (
        httpx.post(base_url + "/v1/chat/completions", json=chat_body(max_tokens=2), timeout=60).status_code
        == 200
    )


def test_non_stream_disconnect_stops_generation(
    base_url: str, record_property: pytest.RecordProperty
) -> None:
    path = "/v1/chat/completions"
    before = _count_499(base_url, path)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            base_url + path,
            json=chat_body("Write a very long story about dragons.", max_tokens=2000),
            timeout=httpx.Timeout(60, read=1.5),
        )
    record_property("stop_seconds", _wait_stopped(base_url, path, before))
