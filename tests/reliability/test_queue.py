"""Back-pressure (checklist 18, 16): a full queue answers 429 with Retry-After, a request that waits
too long gets 503, and a waiting client that leaves frees its place. One server with one decode
slot, one queue place and a 5 s queue timeout."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.support.serving import SMOLLM, assert_openai_error, chat_body, poll, scrape

pytestmark = pytest.mark.slow

QUEUE_TIMEOUT_S = 5
P = "foundry_local_"
LONG = chat_body("Write a very long story about dragons.", max_tokens=2000, stream=True)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import TEST_SERVER_ARGS
    from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

    root = tmp_path_factory.mktemp("small-queue")
    proc = ServerProcess(
        cache_dir=root / "cache",
        log_path=root / "log",
        extra_args=[*TEST_SERVER_ARGS, "--max-batch", "1", "--max-queue", "1"],
        env={"FOUNDRY_LOCAL_QUEUE_TIMEOUT_S": str(QUEUE_TIMEOUT_S)},
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-2000:]


def _gauge(base_url: str, name: str) -> float:
    return scrape(base_url).get(P + name, model=SMOLLM)


@contextlib.contextmanager
def _occupied(base_url: str) -> Iterator[None]:
    """Hold the only decode slot with a long stream until the block ends (then disconnect)."""
    with (
        httpx.Client(base_url=base_url, timeout=60) as c,
        c.stream("POST", "/v1/chat/completions", json=LONG) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()  # keep a reference: a dropped httpx line iterator closes the connection
        next(lines)
        assert _gauge(base_url, "requests_running") == 1
        yield
    assert poll(lambda: _gauge(base_url, "requests_running") == 0, 10)


def _post_in_background(
    pool: ThreadPoolExecutor, url: str, body: dict[str, object], timeout: float = 60
) -> Future[httpx.Response]:
    return pool.submit(httpx.post, url, json=body, timeout=timeout)


def test_full_queue_is_429_with_retry_after(small) -> None:  # type: ignore[no-untyped-def]
    base = small.base_url
    with ThreadPoolExecutor(2) as pool:
        with _occupied(base):
            waiter = _post_in_background(pool, base + "/v1/chat/completions", chat_body(max_tokens=3))
            assert poll(lambda: _gauge(base, "requests_waiting") == 1, QUEUE_TIMEOUT_S)
            for path, body in (
                ("/v1/chat/completions", chat_body(max_tokens=3)),
                ("/v1/completions", {"model": SMOLLM, "prompt": "x", "max_tokens": 3}),
            ):
                r = httpx.post(base + path, json=body, timeout=60)
                assert_openai_error(r, 429, code="queue_full", type_="rate_limit_error")
                assert int(r.headers["retry-after"]) >= 1
        # the slot is free again: the waiter is served
        assert waiter.result(timeout=60).status_code == 200
    m = scrape(base)
    assert m.get(P + "requests_total", model=SMOLLM, endpoint="/v1/chat/completions", status="429") >= 1


def test_waiting_too_long_is_503(small) -> None:  # type: ignore[no-untyped-def]
    base = small.base_url
    with ThreadPoolExecutor(1) as pool, _occupied(base):
        waiter = _post_in_background(pool, base + "/v1/chat/completions", chat_body(max_tokens=3))
        r = waiter.result(timeout=QUEUE_TIMEOUT_S + 60)
        err = assert_openai_error(r, 503, code="queue_timeout", type_="server_error")
        assert r.headers["x-request-id"] in err["message"]
        assert _gauge(base, "requests_waiting") == 0
        assert _gauge(base, "requests_running") == 1  # the running stream is untouched


def test_waiting_client_leaving_frees_its_place(small) -> None:  # type: ignore[no-untyped-def]
    base = small.base_url
    with ThreadPoolExecutor(1) as pool, _occupied(base):
        leaver = pool.submit(
            httpx.post,
            base + "/v1/chat/completions",
            json=chat_body(max_tokens=3),
            timeout=httpx.Timeout(60, read=1.0),
        )
        with pytest.raises(httpx.ReadTimeout):
            leaver.result(timeout=60)
        assert poll(lambda: _gauge(base, "requests_waiting") == 0, 3)
        assert _gauge(base, "requests_running") == 1
        # its place is free: another request can queue (a full queue would say 429)
        queued = _post_in_background(
            pool, base + "/v1/completions", {"model": SMOLLM, "prompt": "x", "max_tokens": 2}
        )
        assert poll(lambda: _gauge(base, "requests_waiting") == 1, 3)
    assert queued.result(timeout=60).status_code == 200


def test_cancelled_stream_lets_the_waiting_request_in_at_once(small) -> None:  # type: ignore[no-untyped-def]
    """The only slot is busy and a request waits: when the running stream's client leaves, its
    sequence is freed and the waiting request starts streaming (bound: generous for CI)."""
    base = small.base_url
    with ThreadPoolExecutor(1) as pool:
        with _occupied(base):
            waiter = _post_in_background(pool, base + "/v1/chat/completions", chat_body(max_tokens=3))
            assert poll(lambda: _gauge(base, "requests_waiting") == 1, QUEUE_TIMEOUT_S)
        # _occupied disconnected and saw running drop to 0; the waiter is admitted and served
        r = waiter.result(timeout=3)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert _gauge(base, "requests_waiting") == 0
