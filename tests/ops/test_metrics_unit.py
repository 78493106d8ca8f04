"""The gauges deploy/ relies on, from the registry and the scheduler (fake engine, fast); the real
engines' numbers are checked against a live server in test_metric_names.py."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import generate_latest

from foundry_local_py.engines.base import GenerationRequest, ReportsKvUsage, SamplingParams
from foundry_local_py.scheduler.scheduler import FinishEvent, Scheduler
from foundry_local_py.server.metrics import Metrics, ModelState
from tests.ops import deploy
from tests.support.fake_engine import FakeEngine, FakeRunner, Script


def _exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_no_created_series_and_no_global_switch() -> None:
    import prometheus_client.metrics as pm

    m = Metrics()
    m.requests.labels("a", "/v1/chat/completions", "200", "").inc()
    m.ttft.labels("a").observe(0.1)
    text = _exposition(m)
    assert "foundry_local_requests_total{" in text
    assert "foundry_local_time_to_first_token_seconds_bucket{" in text
    assert "_created" not in text
    assert pm._use_created, "the process-wide switch must stay untouched"


def test_state_gauges() -> None:
    m = Metrics()
    m.attach_state(lambda: [ModelState("smollm2-135m", "llama.cpp", "cpu", 3, 5, 64, 8, 0.25)], lambda: 123)
    names = deploy.exposed_names(text := _exposition(m))
    assert 'foundry_local_kv_cache_usage_ratio{model="smollm2-135m"} 0.25' in text
    assert 'foundry_local_queue_capacity{model="smollm2-135m"} 64.0' in text
    assert 'foundry_local_batch_slots{model="smollm2-135m"} 8.0' in text
    assert 'foundry_local_requests_waiting{model="smollm2-135m"} 5.0' in text
    assert 'foundry_local_requests_running{model="smollm2-135m"} 3.0' in text
    assert "foundry_local_model_load_failures_total" in names  # declared before any failure


class _KvRunner(FakeRunner):
    """A fake runner that reports 0.1 of its KV cache per running sequence."""

    def kv_usage(self) -> float:
        return 0.1 * len(self._seqs)


class _KvEngine(FakeEngine):
    def create_runner(self) -> FakeRunner:
        return _KvRunner(self)


def _request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, [1, 2, 3], max_tokens=1000, sampling=SamplingParams())


def test_scheduler_reports_the_runners_kv_usage() -> None:
    assert isinstance(_KvRunner(_KvEngine()), ReportsKvUsage)
    assert not isinstance(FakeRunner(FakeEngine()), ReportsKvUsage)
    engine = _KvEngine(Script(loop_forever=True, step_delay=0.005), max_batch=4)
    sched = Scheduler(engine, name="m")
    sched.start()

    async def run() -> tuple[float, float]:
        handles = [sched.submit(_request(f"r{i}")) for i in range(2)]
        deadline = time.monotonic() + 10
        while sched.stats().kv_usage < 0.2 - 1e-9 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        busy = sched.stats().kv_usage
        for h in handles:
            h.cancel()
        while sched.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        return busy, sched.stats().kv_usage

    try:
        busy, idle = asyncio.run(run())
    finally:
        sched.stop(drain=False, timeout=5)
    assert abs(busy - 0.2) < 1e-9
    assert idle == 0.0


def test_scheduler_without_kv_reporting_says_zero() -> None:
    sched = Scheduler(FakeEngine(Script(pieces=[b"a"])), name="m")
    sched.start()

    async def run() -> list[object]:
        h = sched.submit(_request("x"))
        return [e async for e in h.events()]

    try:
        events = asyncio.run(run())
    finally:
        sched.stop(timeout=5)
    assert isinstance(events[-1], FinishEvent)
    assert sched.stats().kv_usage == 0.0
