"""The generation core on FAKE engines (fast): one validation step against declared capabilities,
request accounting for every outcome, and one owner of model loading. The same rules run on the
real models in tests/integration/test_capabilities.py and tests/api/test_token_count.py."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from foundry_local_py.cache.catalog import load_catalog
from foundry_local_py.cache.store import ModelStore
from foundry_local_py.engines.backends import SAMPLING_FIELDS, EngineOptions
from foundry_local_py.generation.request import NEUTRAL
from foundry_local_py.hardware import detect_hardware
from foundry_local_py.server.app import create_app
from foundry_local_py.server.metrics import Metrics as AppMetrics
from foundry_local_py.server.model_manager import ModelManager
from tests.support.fake_app import Loader, fake_settings, wait_health
from tests.support.fake_engine import FAKE_CAPABILITIES, FakeEngine
from tests.support.serving import Metrics, assert_openai_error

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "fake-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
# A value for each sampling field that asks the engine for something (not its neutral value).
ASKING: dict[str, Any] = {
    "temperature": 0.7, "top_p": 0.5, "top_k": 5, "min_p": 0.2, "seed": 3, "presence_penalty": 1.0,
    "frequency_penalty": 1.0, "repeat_penalty": 1.3, "logit_bias": {"65": 5},
}


@pytest.fixture
def loader() -> Loader:
    return Loader()


@pytest.fixture
def client(tmp_path: Path, loader: Loader) -> Any:
    with TestClient(create_app(fake_settings(tmp_path), engine_loader=loader),
                    raise_server_exceptions=False) as c:
        assert wait_health(c) == 200
        yield c


def test_asking_values_cover_every_sampling_field() -> None:
    assert set(ASKING) == set(SAMPLING_FIELDS)
    assert all(ASKING[k] != v for k, v in NEUTRAL.items())


@pytest.mark.parametrize("field", SAMPLING_FIELDS)
def test_a_field_the_engine_lacks_is_a_400_naming_it(client: TestClient, field: str) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, field: ASKING[field]})
    if field in FAKE_CAPABILITIES.sampling:
        assert r.status_code == 200, r.text
    else:
        err = assert_openai_error(r, 400, param=field)
        assert "fake" in err["message"]


@pytest.mark.parametrize("field", sorted(NEUTRAL))
def test_a_neutral_value_asks_for_nothing_and_passes(client: TestClient, field: str) -> None:
    assert client.post("/v1/chat/completions", json={**CHAT, field: NEUTRAL[field]}).status_code == 200


def test_unsupported_logprobs_and_forced_tools_are_400s(client: TestClient) -> None:
    assert_openai_error(client.post("/v1/chat/completions", json={**CHAT, "logprobs": True}), 400,
                        param="logprobs")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = client.post("/v1/chat/completions", json={**CHAT, "tools": [tool], "tool_choice": "required"})
    assert_openai_error(r, 400, param="tool_choice")
    # Completions name their logprobs field 'logprobs' too.
    r = client.post("/v1/completions", json={"model": "fake-chat", "prompt": "x", "logprobs": 2})
    assert_openai_error(r, 400, param="logprobs")


def test_the_context_error_names_the_field_the_client_sent(client: TestClient) -> None:
    body = {**CHAT}
    del body["max_tokens"]
    r = client.post("/v1/chat/completions", json={**body, "max_completion_tokens": 1000})
    err = assert_openai_error(r, 400, code="context_length_exceeded", param="max_completion_tokens")
    assert "256" in err["message"]
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 1000})
    assert_openai_error(r, 400, code="context_length_exceeded", param="max_tokens")
    r = client.post("/v1/completions", json={"model": "fake-chat", "prompt": "x" * 300})
    assert_openai_error(r, 400, code="context_length_exceeded", param="prompt")


def test_every_outcome_is_counted(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404

    def boom(self: FakeEngine, text: str, *, add_special: bool = True) -> list[int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(FakeEngine, "tokenize", boom)
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
    m = Metrics(client.get("/metrics").text)
    ep = "/v1/chat/completions"
    assert m.get("foundry_local_requests_total", model="fake-chat", endpoint=ep, status="200") == 1
    assert m.get("foundry_local_requests_total", model="fake-chat", endpoint=ep, status="500") == 1
    # Before the model is known (bad body, unknown model) the model label is empty.
    assert m.get("foundry_local_requests_total", model="", endpoint=ep, status="400") == 1
    assert m.get("foundry_local_requests_total", model="", endpoint=ep, status="404") == 1


# --- one owner of model loading -------------------------------------------------------------


def _manager(tmp_path: Path, loader: Loader, **settings: Any) -> ModelManager:
    s = fake_settings(tmp_path, **settings)
    return ModelManager(s, load_catalog(s.cache_dir, s.catalog_path), ModelStore(s.cache_dir), AppMetrics(),
                        detect_hardware(), engine_loader=loader)


class CountingLoader(Loader):
    """Slow loads, and the most engines alive (loaded, not yet closed) at any moment."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()
        self.peak = 0

    def __call__(self, fmt: str, path: Path, options: EngineOptions) -> FakeEngine:
        time.sleep(0.3)  # both loads are in flight at once
        engine = super().__call__(fmt, path, options)
        with self.lock:
            self.peak = max(self.peak, sum(not e.closed for e in self.engines))
        return engine


def test_two_concurrent_loads_with_room_for_one_end_with_one(tmp_path: Path) -> None:
    loader = CountingLoader()
    manager = _manager(tmp_path, loader, max_loaded_models=1)

    async def scenario() -> list[str]:
        manager.start()
        try:
            await asyncio.gather(manager.load("fake-chat"), manager.load("fake-base"))
            return [lm.alias for lm in manager.loaded()]
        finally:
            await manager.close()

    loaded = asyncio.run(scenario())
    assert len(loaded) == 1
    assert len(loader.engines) == 2  # both were loaded, one after the other evicted
    assert loader.peak == 1, "two engines were alive at once: the capacity check raced"


def test_a_load_that_does_not_fit_the_memory_budget_evicts_first(tmp_path: Path) -> None:
    loader = CountingLoader()
    # Each fake model counts its file (32 B) + the prompt cache; the budget holds one of them.
    manager = _manager(tmp_path, loader, memory_budget_bytes=(1 << 20) + 100, prompt_cache_mib=1)

    async def scenario() -> list[str]:
        try:
            await manager.load("fake-chat")
            await manager.load("fake-base")
            return [lm.alias for lm in manager.loaded()]
        finally:
            await manager.close()

    assert asyncio.run(scenario()) == ["fake-base"]
    assert loader.peak == 1


def test_the_reaper_survives_an_unexpected_exception(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loader = Loader()
    manager = _manager(tmp_path, loader)
    real = manager.reap_once
    calls = {"n": 0}

    async def flaky(now: float) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("not a FoundryError")
        return await real(now)

    monkeypatch.setattr(manager, "reap_once", flaky)

    async def scenario() -> int:
        manager.start()
        try:
            await manager.load("fake-chat", ttl=0.2)
            deadline = time.monotonic() + 10
            while manager.loaded() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return len(manager.loaded())
        finally:
            await manager.close()

    assert asyncio.run(scenario()) == 0, "the idle model was not unloaded after the reaper failed"
    assert calls["n"] >= 2
    assert manager.metrics.internal_errors.labels("reaper")._value.get() == 1


class SlowTokenizer(FakeEngine):
    """Tokenizes slowly, and records a call made after the engine was closed (in llama.cpp that
    reads freed memory)."""

    used_after_close = 0

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        time.sleep(0.4)
        if self.closed:
            SlowTokenizer.used_after_close += 1
            raise RuntimeError("tokenize on a closed engine")
        return super().tokenize(text, add_special=add_special)


class SlowTokenizerLoader(Loader):
    def __call__(self, fmt: str, path: Path, options: EngineOptions) -> FakeEngine:
        engine = SlowTokenizer(self.script, max_batch=options.max_batch, chat="base" not in path.name)
        self.engines.append(engine)
        return engine


def test_a_model_in_use_between_resolution_and_admission_is_not_evicted(tmp_path: Path) -> None:
    """With room for one model, a request that resolved a model (here: counting its prompt's
    tokens, or validating a chat before it reaches the scheduler) holds it: a load of another
    model waits for it instead of closing the engine under it (Ollama's runner reference count)."""
    SlowTokenizer.used_after_close = 0
    loader = SlowTokenizerLoader()
    with TestClient(create_app(fake_settings(tmp_path, max_loaded_models=1), engine_loader=loader),
                    raise_server_exceptions=False) as c:
        assert wait_health(c) == 200
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200  # fake-chat is loaded
        results: dict[str, Any] = {}

        def count() -> None:
            results["count"] = c.post("/v1/chat/completions/tokenizer/encode/count", json=CHAT)

        def other() -> None:
            time.sleep(0.1)  # while the count tokenizes
            results["other"] = c.post("/v1/completions", json={"model": "fake-base", "prompt": "hi",
                                                               "max_tokens": 5})

        threads = [threading.Thread(target=count), threading.Thread(target=other)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results["count"].status_code == 200, results["count"].text
        assert results["other"].status_code == 200, results["other"].text
    assert SlowTokenizer.used_after_close == 0
