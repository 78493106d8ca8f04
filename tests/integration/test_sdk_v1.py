"""Foundry Local's 1.x SDK shape, in-process: catalog, models, download progress, load/unload,
the web service sharing the loaded model, execution providers; and both SDK shapes in one
process sharing one cache."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from foundry_local_py.sdk.v1 import Configuration, FoundryLocalException, FoundryLocalManager
from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import SMOL_FILE, SMOL_REPO, smol_gguf_path, write_user_catalog
from tests.support.serving import free_port

SMOL = "smollm2-135m"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_file(SMOL_REPO, SMOL_FILE, smol_gguf_path())
        yield server


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: FakeHub) -> Iterator[FoundryLocalManager]:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    hub.reset()
    FoundryLocalManager.initialize(Configuration(
        app_name="tests", model_cache_dir=str(tmp_path / "cache"),
        additional_settings={"n_threads": "1", "parallel": "4"}))
    m = FoundryLocalManager.instance
    assert m is not None
    yield m
    m.close()
    assert FoundryLocalManager.instance is None


def test_configuration_is_checked():
    with pytest.raises(FoundryLocalException, match="invalid characters"):
        Configuration(app_name="bad/name").validate()
    with pytest.raises(FoundryLocalException, match="unknown additional_settings: nope"):
        Configuration(app_name="a", additional_settings={"nope": "1"}).to_settings()
    web = Configuration.WebService(urls="http://127.0.0.1:5999;http://localhost:6000")
    assert Configuration(app_name="a", web=web).bind_address() == ("127.0.0.1", 5999)


def test_catalog_and_model_surface(manager: FoundryLocalManager):
    with pytest.raises(FoundryLocalException, match="singleton"):
        FoundryLocalManager.initialize(Configuration(app_name="again"))
    catalog = manager.catalog
    assert SMOL in {m.alias for m in catalog.list_models()}
    assert catalog.get_model("no-such-model") is None and catalog.get_model("  ") is None
    model = catalog.get_model(SMOL)
    assert model is not None and model is catalog.get_model(SMOL)  # one object per alias
    assert model.id == "smollm2-135m-instruct-q4_1-gguf-cpu:1"  # this machine's choice: the GGUF
    assert (model.context_length, model.supports_tool_calling) == (8192, True)
    assert model.info.runtime.device_type == "CPU" and model.info.model_type == "GGUF"
    assert len(model.variants) > 1 and model.is_cached
    onnx = next(v for v in model.variants if "int8-onnx" in v.id)
    model.select_variant(onnx)
    assert model.id == onnx.id and not model.is_cached
    model.select_variant(model.variants[0])
    with pytest.raises(FoundryLocalException):
        model.variants[0].select_variant(onnx)
    variant = catalog.get_model_variant(model.id)
    assert variant is not None and variant.variants == [variant]
    assert catalog.get_model_variant("nope:1") is None
    assert model.id in {v.id for v in catalog.get_cached_models()}

    seen: list[float] = []
    model.download(seen.append)
    assert seen[-1] == 100.0  # shipped in a wheel: done at once, still reported
    assert not model.is_loaded and catalog.get_loaded_models() == []
    model.load()
    assert model.is_loaded and [v.id for v in catalog.get_loaded_models()] == [model.id]
    assert Path(model.get_path()).name == SMOL_FILE
    model.unload()
    assert not model.is_loaded
    with pytest.raises(FoundryLocalException, match="audio"):
        model.get_audio_client()


def test_execution_providers_are_reported_through_the_callback(manager: FoundryLocalManager):
    calls: list[tuple[str, float]] = []
    result = manager.download_and_register_eps(progress_callback=lambda n, p: calls.append((n, p)))
    assert result.success and "CPUExecutionProvider" in result.registered_eps
    assert ("CPUExecutionProvider", 100.0) in calls
    assert all(0.0 <= p <= 100.0 for _, p in calls)
    eps = {e.name: e.is_registered for e in manager.discover_eps()}
    assert eps["CPUExecutionProvider"] is True
    result = manager.download_and_register_eps(["CPUExecutionProvider", "QNNExecutionProvider"])
    assert not result.success and result.failed_eps == ["QNNExecutionProvider"]


def test_hub_download_reports_percentages_and_can_be_cancelled(manager: FoundryLocalManager, hub: FakeHub):
    model = manager.catalog.get_model(f"hf.co/{SMOL_REPO}")
    assert model is not None and model.alias == f"hf.co/{SMOL_REPO}" and not model.is_cached
    stop = threading.Event()
    hub.faults.rate_bytes_per_s = 40e6

    def cancel_at_10(pct: float) -> None:
        if pct > 10:
            stop.set()

    with pytest.raises(FoundryLocalException, match="cancelled"):
        model.download(cancel_at_10, cancel_event=stop)
    assert not model.is_cached
    hub.faults.rate_bytes_per_s = None
    seen: list[float] = []
    model.download(seen.append)
    assert model.is_cached and seen[-1] == 100.0
    assert seen == sorted(seen) and seen[0] > 10  # resumed, not restarted
    assert len(seen) > 5
    assert model.context_length == 8192  # read from the downloaded file
    model.remove_from_cache()
    assert not model.is_cached


def test_web_service_serves_the_model_loaded_in_process(manager: FoundryLocalManager):
    model = manager.catalog.get_model(SMOL)
    assert model is not None
    model.load()
    manager.start_web_service()
    assert manager.urls and manager.urls[0].startswith("http://127.0.0.1:")
    client = openai.OpenAI(base_url=manager.urls[0] + "/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(model=model.id, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert reply.choices[0].message.content
    loaded = httpx.get(manager.urls[0] + "/openai/loadedmodels", timeout=10).json()
    assert [m["name"] for m in loaded] == [model.id]  # the same model, not a second copy
    url = manager.urls[0]
    manager.stop_web_service()
    assert manager.urls is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
    with pytest.raises(FoundryLocalException, match="not running"):
        manager.stop_web_service()


@pytest.mark.slow
def test_both_sdk_shapes_in_one_process_share_the_cache(tmp_path: Path, hub: FakeHub,
                                                        monkeypatch: pytest.MonkeyPatch):
    """The first shape's service (another process) and the in-process runtime download the same
    model into one cache at the same time: the cross-process lock makes one wait, both succeed,
    and one verified copy is left; both then answer with it."""
    from foundry_local_py import FoundryLocalManager as ServiceManager
    from foundry_local_py.config import Settings

    cache = tmp_path / "shared"
    write_user_catalog(cache)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    hub.reset()
    hub.faults.rate_bytes_per_s = 60e6  # ~1.6 s per copy: the two downloads overlap
    legacy = ServiceManager(settings=Settings(cache_dir=cache, port=free_port(), n_threads=1, preload=False),
                            timeout=120)
    FoundryLocalManager.initialize(Configuration(app_name="both", model_cache_dir=str(cache),
                                                 additional_settings={"n_threads": "1"}))
    v1 = FoundryLocalManager.instance
    assert v1 is not None
    try:
        errors: list[BaseException] = []

        def legacy_pull() -> None:
            try:
                legacy.download_model("smol-hub")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=legacy_pull)
        t.start()
        model = v1.catalog.get_model("smol-hub")
        assert model is not None
        model.download()
        t.join(120)
        assert not errors, errors
        gets = hub.gets(SMOL_FILE)
        assert sum(g.sent for g in gets) < 2 * 98_362_432  # one copy fetched, not two
        assert model.is_cached
        model.load()
        info = legacy.load_model("smol-hub")
        assert info is not None
        client = openai.OpenAI(base_url=legacy.endpoint, api_key=legacy.api_key, max_retries=0)
        reply = client.chat.completions.create(model=model.id, max_tokens=4,
                                               messages=[{"role": "user", "content": "Hi"}])
        assert reply.choices[0].message.content is not None
    finally:
        v1.close()
        from foundry_local_py.sdk.service import stop_service

        stop_service(legacy.settings)


def _loaded_smol(manager: FoundryLocalManager):
    model = manager.catalog.get_model(SMOL)
    assert model is not None
    model.load()
    return model


@pytest.mark.slow
def test_chat_client_in_process(manager: FoundryLocalManager):
    model = _loaded_smol(manager)
    client = model.get_chat_client()
    client.settings.max_tokens = 12
    client.settings.temperature = 0.0
    messages = [{"role": "user", "content": "Name three colors."}]
    reply = client.complete_chat(messages)
    text = reply.choices[0].message.content
    assert text and reply.usage is not None and reply.usage.completion_tokens <= 12
    assert reply.model == model.id and reply.id.startswith("chatcmpl-")
    chunks = list(client.complete_streaming_chat(messages))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # the same tokens either way (temperature 0)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # Foundry's settings names: random_seed, top_k; and its tool_choice / json_schema shapes
    client.settings.random_seed, client.settings.top_k, client.settings.temperature = 7, 5, 0.9
    a = client.complete_chat(messages).choices[0].message.content
    assert a == client.complete_chat(messages).choices[0].message.content
    client.settings = type(client.settings)(max_tokens=40, response_format={
        "type": "json_schema",
        "json_schema": '{"type": "object", "properties": {"color": {"enum": ["red", "blue"]}},'
                       ' "required": ["color"]}'})
    import json

    content = client.complete_chat(messages).choices[0].message.content
    assert json.loads(content or "")["color"] in ("red", "blue")


def test_chat_client_errors(manager: FoundryLocalManager):
    client = _loaded_smol(manager).get_chat_client()
    with pytest.raises(ValueError, match="non-empty"):
        client.complete_chat([])
    with pytest.raises(ValueError, match="role"):
        client.complete_chat([{"content": "x"}])
    client.settings.temperature = 7.0  # out of range: the same 400 an HTTP client gets
    with pytest.raises(FoundryLocalException, match="temperature"):
        client.complete_chat([{"role": "user", "content": "hi"}])
    other = manager.catalog.get_model("qwen2.5-0.5b-instruct")
    assert other is not None
    with pytest.raises(FoundryLocalException, match=r"not in the cache|download"):
        other.get_chat_client().complete_chat([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_tool_calls_in_process(manager: FoundryLocalManager):
    client = _loaded_smol(manager).get_chat_client()
    client.settings.tool_choice = {"type": "function", "name": "get_weather"}  # Foundry's shape
    client.settings.max_tokens = 64
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    reply = client.complete_chat([{"role": "user", "content": "Weather in Paris?"}], tools=tools)
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert calls and calls[0].function.name == "get_weather"
    streamed = [c for c in client.complete_streaming_chat(
        [{"role": "user", "content": "Weather in Paris?"}], tools=tools) if c.choices]
    assert any(c.choices[0].delta.tool_calls for c in streamed)


@pytest.mark.slow
def test_two_threads_chatting_share_a_batch(manager: FoundryLocalManager):
    model = _loaded_smol(manager)
    scheduler_states = manager._core.manager.states
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for s in scheduler_states():
                peak[0] = max(peak[0], s.running)
            stop.wait(0.005)

    results: list[str] = []

    def chat(i: int) -> None:
        client = model.get_chat_client()
        client.settings.max_tokens = 48
        reply = client.complete_chat([{"role": "user", "content": f"Count from {i} to {i + 20}."}])
        results.append(reply.choices[0].message.content or "")

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=chat, args=(i,)) for i in (1, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    watcher.join()
    assert len(results) == 2 and all(results)
    assert peak[0] == 2  # both sequences decoded in the same steps


def test_leaving_a_stream_early_cancels_it(manager: FoundryLocalManager):
    model = _loaded_smol(manager)
    client = model.get_chat_client()
    client.settings.max_tokens = 400
    stream = client.complete_streaming_chat([{"role": "user", "content": "Write a long story."}])
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    import time

    deadline = time.monotonic() + 1.0  # 400 tokens would take several seconds on one thread
    while time.monotonic() < deadline:
        states = list(manager._core.manager.states())
        if states and states[0].running == 0:
            break
        time.sleep(0.01)
    assert states and states[0].running == 0


def test_embedding_client_in_process(manager: FoundryLocalManager):
    client = _loaded_smol(manager).get_embedding_client()
    one = client.generate_embedding("The quick brown fox")
    vec = one.data[0].embedding
    assert len(vec) == 576 and abs(sum(x * x for x in vec) - 1.0) < 1e-3  # normalised
    many = client.generate_embeddings(["a cat", "a dog", "the stock market"])
    assert [d.index for d in many.data] == [0, 1, 2] and many.usage.prompt_tokens > 0
    with pytest.raises(ValueError):
        client.generate_embedding("  ")


def test_in_process_requests_are_counted_in_metrics(manager: FoundryLocalManager):
    client = _loaded_smol(manager).get_chat_client()
    client.settings.max_tokens = 4
    client.complete_chat([{"role": "user", "content": "hi"}])
    manager.start_web_service()
    assert manager.urls is not None
    text = httpx.get(manager.urls[0] + "/metrics", timeout=10).text
    assert 'endpoint="sdk:/v1/chat/completions"' in text


@pytest.mark.slow
def test_foundry_sample_calls_with_its_alias_and_a_shipped_hub_entry(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """The calls of Foundry Local's native-chat-completions sample, with its model alias
    (qwen2.5-0.5b): the shipped catalog entry (repo + quant at a pinned commit) is resolved
    through the hub's listing and downloaded. The fake hub serves that commit, with the SmolLM2
    GGUF standing in for the Q4_K_M file (and a Q8_0 file the default must not pick)."""
    from foundry_local_py.cache.catalog import Catalog

    entry = Catalog.load().model("qwen2.5-0.5b")
    assert entry is not None and entry.alias == "qwen2.5-0.5b-instruct"
    source = entry.variants[0].source
    with FakeHub(commit=source.revision) as qwen_hub:  # type: ignore[union-attr]
        repo = source.repo  # type: ignore[union-attr]
        qwen_hub.add_file(repo, "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", smol_gguf_path())
        decoy = tmp_path / "q8.gguf"
        decoy.write_bytes(b"GGUF" + b"\0" * 4096)
        qwen_hub.add_file(repo, "Qwen2.5-0.5B-Instruct-Q8_0.gguf", decoy)
        monkeypatch.setenv("HF_ENDPOINT", qwen_hub.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("FOUNDRY_LOCAL_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("FOUNDRY_LOCAL_N_THREADS", "1")

        # --- as in the sample -------------------------------------------------------------
        config = Configuration(app_name="foundry_local_samples")
        FoundryLocalManager.initialize(config)
        manager = FoundryLocalManager.instance
        assert manager is not None
        try:
            eps: list[str] = []
            manager.download_and_register_eps(progress_callback=lambda name, pct: eps.append(name))
            model = manager.catalog.get_model("qwen2.5-0.5b")
            assert model is not None
            progress: list[float] = []
            model.download(progress.append)
            model.load()
            client = model.get_chat_client()
            client.settings.max_tokens = 16
            messages = [{"role": "user", "content": "What is the golden ratio?"}]
            text = ""
            for chunk in client.complete_streaming_chat(messages):
                content = chunk.choices[0].delta.content if chunk.choices else None
                if content:
                    text += content
            model.unload()
            # ------------------------------------------------------------------------------------
            assert "CPUExecutionProvider" in eps
            assert progress[-1] == 100.0 and len(progress) > 2
            assert text.strip()
            got = [g.path for g in qwen_hub.gets(".gguf")]
            assert got and all(p.endswith("Q4_K_M.gguf") for p in got)  # the quant, not the decoy
        finally:
            manager.close()


@pytest.mark.slow
def test_in_process_answers_equal_the_web_service_answers(manager: FoundryLocalManager):
    """The clients take the server's own path: the same request gives the same output in-process
    and through start_web_service's HTTP API (chat, stream, forced tool call, embeddings)."""
    model = _loaded_smol(manager)
    manager.start_web_service()
    assert manager.urls is not None
    web = openai.OpenAI(base_url=manager.urls[0] + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Name three colors."}]
    client = model.get_chat_client()
    client.settings.max_tokens, client.settings.temperature = 24, 0.0
    local = client.complete_chat(messages)
    remote = web.chat.completions.create(model=model.id, messages=messages,  # type: ignore[arg-type]
                                         max_tokens=24, temperature=0.0)
    assert local.choices[0].message.content == remote.choices[0].message.content
    assert local.usage is not None and remote.usage is not None  # (cached_tokens differ: 2nd time)
    assert (local.usage.prompt_tokens, local.usage.completion_tokens) == (
        remote.usage.prompt_tokens, remote.usage.completion_tokens)
    streamed = "".join(c.choices[0].delta.content or "" for c in web.chat.completions.create(
        model=model.id, messages=messages, max_tokens=24, temperature=0.0, stream=True)  # type: ignore[arg-type]
        if c.choices)
    assert streamed == local.choices[0].message.content

    tools = [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                              "required": ["city"]}}}]
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    client.settings.tool_choice, client.settings.max_tokens = {"type": "required"}, 48
    local_call = client.complete_chat(ask, tools=tools).choices[0].message.tool_calls
    remote_call = web.chat.completions.create(model=model.id, messages=ask, tools=tools,  # type: ignore[arg-type]
                                              tool_choice="required", max_tokens=48,
                                              temperature=0.0).choices[0].message.tool_calls
    assert local_call and remote_call
    assert [(c.function.name, c.function.arguments) for c in local_call] == [
        (c.function.name, c.function.arguments) for c in remote_call]

    texts = ["a cat", "the stock market"]
    local_vecs = [d.embedding for d in model.get_embedding_client().generate_embeddings(texts).data]
    remote_vecs = [d.embedding for d in web.embeddings.create(model=model.id, input=texts).data]
    for a, b in zip(local_vecs, remote_vecs, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
