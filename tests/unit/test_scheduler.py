"""scheduler.Scheduler with a FAKE engine: events, batching up to max_batch, cancellation frees the
slot, 429 when full, queue timeout, failures, stop/drain. (The real model: tests/reliability.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from foundry_local_py.engines.base import GenerationRequest
from foundry_local_py.errors import (
    EngineError,
    InvalidRequestError,
    QueueTimeoutError,
    RateLimitError,
    ServiceUnavailableError,
)
from foundry_local_py.scheduler.scheduler import (
    ErrorEvent,
    FinishEvent,
    RequestHandle,
    Scheduler,
    StreamEvent,
    TextEvent,
)
from tests.support.fake_engine import FakeEngine, Script

pytestmark = pytest.mark.timeout(30)

_counter = iter(range(10**9))


def req(max_tokens: int = 100, stop: list[str] | None = None) -> GenerationRequest:
    return GenerationRequest(f"r{next(_counter)}", [1, 2, 3], max_tokens, stop=stop or [])


def run(body: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(body(), 20))


async def collect(handle: RequestHandle) -> list[StreamEvent]:
    return [e async for e in handle.events()]


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def make(script: Script | None = None, *, max_batch: int = 2, **kw: Any) -> tuple[Scheduler, FakeEngine]:
    engine = FakeEngine(script, max_batch=max_batch)
    sched = Scheduler(engine, name="fake", **kw)
    sched.start()
    return sched, engine


def test_events_text_then_finish() -> None:
    sched, engine = make()

    async def body() -> list[StreamEvent]:
        return await collect(sched.submit(req()))

    events = run(body)
    sched.stop()
    texts = [e for e in events if isinstance(e, TextEvent)]
    assert "".join(e.text for e in texts) == "Hello, world!"
    assert sum(e.n_tokens for e in texts) == 4
    fin = events[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "stop"
    assert fin.prompt_tokens == 3 and fin.completion_tokens == 4
    assert engine.stats.removed == engine.stats.added  # the slot was released
    assert sched.stats().completed == 1 and sched.stats().running == 0


def test_max_tokens_and_stop() -> None:
    sched, _ = make(Script(loop_forever=True))

    async def body() -> tuple[list[StreamEvent], list[StreamEvent]]:
        a = sched.submit(req(max_tokens=3))
        b = sched.submit(req(stop=[" wor"]))
        return await collect(a), await collect(b)

    a, b = run(body)
    sched.stop()
    assert "".join(e.text for e in a if isinstance(e, TextEvent)) == "Hello, world"
    assert isinstance(a[-1], FinishEvent) and a[-1].reason == "length" and a[-1].completion_tokens == 3
    assert "".join(e.text for e in b if isinstance(e, TextEvent)) == "Hello,"
    assert isinstance(b[-1], FinishEvent) and b[-1].reason == "stop"


def test_batching_admits_up_to_max_batch() -> None:
    sched, engine = make(Script(pieces=[b"x"] * 20, step_delay=0.002), max_batch=3)

    async def body() -> list[list[StreamEvent]]:
        handles = [sched.submit(req()) for _ in range(7)]
        await until(lambda: sched.stats().running == 3)
        assert sched.stats().waiting == 4
        return await asyncio.gather(*(collect(h) for h in handles))

    results = run(body)
    sched.stop()
    assert engine.stats.peak_active == 3
    assert all(isinstance(r[-1], FinishEvent) and r[-1].completion_tokens == 20 for r in results)
    assert len(engine.stats.added) == 7 and sorted(engine.stats.removed) == sorted(engine.stats.added)


def test_cancellation_frees_the_slot() -> None:
    sched, engine = make(Script(loop_forever=True, step_delay=0.002), max_batch=1)

    async def body() -> list[StreamEvent]:
        a = sched.submit(req(max_tokens=10**6))
        first = await a.queue.get()
        assert isinstance(first, TextEvent)
        b = sched.submit(req(max_tokens=5))
        await until(lambda: sched.stats().waiting == 1)
        a.cancel()
        events_b = await collect(b)
        rest_a = []
        while not a.queue.empty():
            rest_a.append(a.queue.get_nowait())
        assert isinstance(rest_a[-1], FinishEvent) and rest_a[-1].reason == "cancelled"
        return events_b

    events_b = run(body)
    stats = sched.stats()
    sched.stop()
    assert isinstance(events_b[-1], FinishEvent) and events_b[-1].reason == "length"
    assert stats.cancelled == 1 and stats.running == 0 and stats.waiting == 0
    assert engine.stats.removed[0] == engine.stats.added[0]  # the cancelled sequence left the runner


def test_abandoned_event_iterator_cancels() -> None:
    sched, _ = make(Script(loop_forever=True, step_delay=0.002), max_batch=1)

    async def body() -> None:
        h = sched.submit(req(max_tokens=10**6))
        events = h.events()
        async for _ in events:
            break  # the consumer goes away
        await events.aclose()  # what the server's stream does when its client leaves
        assert h.cancelled
        await until(lambda: sched.stats().running == 0)

    run(body)
    sched.stop()


def test_cancelled_while_waiting_never_runs() -> None:
    sched, engine = make(Script(loop_forever=True, step_delay=0.002), max_batch=1)

    async def body() -> None:
        a = sched.submit(req(max_tokens=10**6))
        await a.queue.get()
        b = sched.submit(req())
        b.cancel()
        await until(lambda: sched.stats().waiting == 0)
        a.cancel()
        await until(lambda: sched.stats().running == 0)

    run(body)
    sched.stop()
    assert len(engine.stats.added) == 1


def test_queue_full_is_429() -> None:
    sched, _ = make(Script(loop_forever=True, step_delay=0.002), max_batch=1, max_queue=2, queue_timeout_s=30)

    async def body() -> None:
        a = sched.submit(req(max_tokens=10**6))
        await a.queue.get()
        waiting = [sched.submit(req()) for _ in range(2)]
        with pytest.raises(RateLimitError) as info:
            sched.submit(req())
        assert info.value.status == 429 and info.value.retry_after == 3
        for h in (a, *waiting):
            h.cancel()
        await until(lambda: sched.stats().running == 0 and sched.stats().waiting == 0)

    run(body)
    sched.stop()


def test_queue_timeout_is_503() -> None:
    sched, _ = make(Script(loop_forever=True, step_delay=0.002), max_batch=1, queue_timeout_s=0.3)

    async def body() -> StreamEvent:
        a = sched.submit(req(max_tokens=10**6))
        await a.queue.get()
        b = sched.submit(req())
        ev = await b.queue.get()
        a.cancel()
        return ev

    ev = run(body)
    sched.stop()
    assert isinstance(ev, ErrorEvent) and isinstance(ev.error, QueueTimeoutError)
    assert ev.error.status == 503


def test_sequence_failure_mid_stream_leaves_others_running() -> None:
    script = Script(pieces=[b"a", b"b", b"c", b"d"], fail_at=2)
    sched, engine = make(script, max_batch=2)

    async def body() -> list[StreamEvent]:
        return await collect(sched.submit(req()))

    events = run(body)
    assert [type(e) for e in events] == [TextEvent, TextEvent, ErrorEvent]
    assert isinstance(events[-1], ErrorEvent) and isinstance(events[-1].error, EngineError)
    script.fail_at = None

    async def again() -> list[StreamEvent]:
        return await collect(sched.submit(req()))

    assert isinstance(run(again)[-1], FinishEvent)  # the scheduler goes on
    sched.stop()
    assert sorted(engine.stats.removed) == sorted(engine.stats.added)


def test_add_error_is_reported_to_that_request() -> None:
    script = Script(add_error=InvalidRequestError("prompt too long", param="messages"))
    sched, _ = make(script)

    async def body() -> list[StreamEvent]:
        return await collect(sched.submit(req()))

    events = run(body)
    sched.stop()
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert events[0].error.status == 400


def test_runner_crash_fails_everyone_and_stops_admitting() -> None:
    script = Script(loop_forever=True, step_delay=0.01)
    sched, _ = make(script, max_batch=1)

    async def body() -> tuple[list[StreamEvent], list[StreamEvent]]:
        a = sched.submit(req(max_tokens=10**6))
        await a.queue.get()
        b = sched.submit(req())
        script.step_error = RuntimeError("segfault-ish /secret/path")
        ea, eb = await collect(a), await collect(b)
        with pytest.raises(ServiceUnavailableError):
            sched.submit(req())
        return ea, eb

    ea, eb = run(body)
    sched.stop()
    for events in (ea, eb):
        assert isinstance(events[-1], ErrorEvent)
        assert events[-1].error.status == 500 and "/secret" not in events[-1].error.message


def test_stop_drains_running_requests() -> None:
    sched, engine = make(Script(pieces=[b"x"] * 30, step_delay=0.002), max_batch=1)

    async def body() -> list[StreamEvent]:
        h = sched.submit(req())
        await h.queue.get()
        await asyncio.get_running_loop().run_in_executor(None, lambda: sched.stop(drain=True, timeout=10))
        with pytest.raises(ServiceUnavailableError):
            sched.submit(req())
        events = []
        while not h.queue.empty():
            events.append(h.queue.get_nowait())
        return events

    events = run(body)
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "stop"
    assert engine.closed_runners == 1


def test_stop_without_drain_ends_running_and_waiting_requests_with_503() -> None:
    sched, _ = make(Script(loop_forever=True, step_delay=0.002), max_batch=1)

    async def body() -> tuple[StreamEvent, StreamEvent]:
        running = sched.submit(req(max_tokens=10**6))
        waiting = sched.submit(req(max_tokens=10))
        await running.queue.get()
        await asyncio.get_running_loop().run_in_executor(None, lambda: sched.stop(drain=False, timeout=10))
        await asyncio.sleep(0.01)
        lasts = []
        for h in (running, waiting):
            last = None
            while not h.queue.empty():
                last = h.queue.get_nowait()
            assert last is not None
            lasts.append(last)
        return lasts[0], lasts[1]

    for last in run(body):
        assert isinstance(last, ErrorEvent) and last.error.status == 503
        assert "unloaded" in last.error.message


def test_an_unload_past_its_drain_timeout_ends_the_requests_before_freeing_the_engine() -> None:
    """A request still running when the drain times out is ended (503) and the engine is freed only
    after the worker stopped; a worker stuck in a step keeps its engine (freeing a llama.cpp context
    under a running decode crashes the server)."""
    from types import SimpleNamespace

    from foundry_local_py.server.model_manager import ModelManager

    sched, engine = make(Script(loop_forever=True, step_delay=0.002), max_batch=1)

    async def body() -> StreamEvent:
        running = sched.submit(req(max_tokens=10**6))
        await running.queue.get()
        lm = SimpleNamespace(scheduler=sched, engine=engine, id="fake")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: ModelManager._close_sync(lm, True, timeout=0.2))  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        last = None
        while not running.queue.empty():
            last = running.queue.get_nowait()
        assert last is not None
        return last

    last = run(body)
    assert isinstance(last, ErrorEvent) and last.error.status == 503
    assert sched.stopped and engine.closed

    stuck_script = Script(loop_forever=True, step_delay=3.0)
    stuck, stuck_engine = make(stuck_script, max_batch=1)

    async def stuck_body() -> None:
        stuck.submit(req(max_tokens=10**6))
        await until(lambda: stuck_engine.closed_runners == 0 and stuck.stats().running == 1)
        await asyncio.sleep(0.1)  # inside the 3 s step
        lm = SimpleNamespace(scheduler=stuck, engine=stuck_engine, id="stuck")
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: ModelManager._close_sync(lm, True, timeout=0.2))  # type: ignore[arg-type]

    run(stuck_body)
    assert not stuck.stopped and not stuck_engine.closed, "the engine was freed under a running step"
    stuck.stop(drain=False, timeout=10)
    assert stuck.stopped
