"""Model lifecycle and management on real servers with the real models.

Several models loaded at once, on-demand loading, idle TTL, LRU eviction under a bound, unloading
(busy, forced, all), downloads through ``POST /openai/download`` from a local hub, provider
fallback from a corrupt variant, per-request ``ep``, the hardware report, embeddings and the token
counter. Two servers are shared by the module: ``lab`` (SmolLM2 preloaded, an extra catalog with hub
and fallback aliases, ``HF_ENDPOINT`` pointing at the fake hub) and ``bounded`` (``--no-preload``,
at most one model loaded). Each test sets up the state it needs, so they run in any order.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import gguf
import httpx
import openai
import pytest

from tests.conftest import TEST_SERVER_ARGS
from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import (
    SMOL_FILE,
    SMOL_REPO,
    SMOL_SHA256,
    SMOL_SIZE,
    catalog_entries,
    smol_gguf_path,
)
from tests.support.serving import (
    DRAINED_EXIT_CODES,
    GEMMA,
    GEMMA_VARIANT,
    SMOLLM,
    ServerProcess,
    assert_no_leaks,
    assert_openai_error,
    chat_body,
    poll,
    scrape,
    sse_events,
)

pytestmark = pytest.mark.slow

SMOL_ID = "smollm2-135m-instruct-q4_1-gguf-cpu:1"
GEMMA_ID = f"{GEMMA_VARIANT}:1"
FALLBACK = "fallback-smol"
BROKEN_ID = "fallback-smol-broken-gguf-cpu:2"
GOOD_ID = "fallback-smol-good-gguf-cpu:1"
HUB_ALIAS, HUB_ID = "smol-hub", "smol-hub-q4_1-gguf:1"
PINNED_ALIAS, PINNED_ID = "smol-pinned", "smol-pinned-q4_1-gguf:1"
# SmolLM2's end-of-generation tokens (<|endoftext|>, <|im_end|>): banned, a stream runs to max_tokens.
NO_EOS = {"0": -100, "2": -100}


# --- servers -----------------------------------------------------------------------------------


def _local_variant(name: str, version: int, path: Path) -> dict[str, Any]:
    return {"name": name, "version": version, "format": "gguf", "precision": "q4_1",
            "source": {"kind": "local", "path": str(path)}}


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        hosted = server.add_file(SMOL_REPO, SMOL_FILE, smol_gguf_path())
        assert hosted.sha256 == SMOL_SHA256 and hosted.size == SMOL_SIZE
        yield server


@pytest.fixture(scope="module")
def lab_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lifecycle")


@pytest.fixture(scope="module")
def lab(lab_root: Path, hub: FakeHub) -> Iterator[ServerProcess]:
    """SmolLM2 preloaded; catalog extras: the hub aliases and ``fallback-smol``, whose preferred
    variant (version 2) is a truncated GGUF (valid header, no tensors) and whose other variant is the
    real SmolLM2 file."""
    broken = lab_root / "broken.gguf"
    with smol_gguf_path().open("rb") as f:
        broken.write_bytes(f.read(1 << 20))
    fallback = {
        "alias": FALLBACK, "display_name": FALLBACK, "publisher": "test", "license": "apache-2.0",
        "context_length": 8192,
        "variants": [
            _local_variant("fallback-smol-good-gguf-cpu", 1, smol_gguf_path()),
            _local_variant("fallback-smol-broken-gguf-cpu", 2, broken),
        ],
    }
    catalog = lab_root / "extra-catalog.json"
    catalog.write_text(json.dumps({"schema_version": 1, "models": [*catalog_entries(), fallback]}))
    proc = ServerProcess(
        cache_dir=lab_root / "cache", log_path=lab_root / "lab.log",
        extra_args=[*TEST_SERVER_ARGS, "--catalog", str(catalog)],
        env={"HF_ENDPOINT": hub.url, "HF_HOME": str(lab_root / "hf-home"), "HF_HUB_OFFLINE": ""},
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-3000:]


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Nothing preloaded, at most one model loaded at a time."""
    root = tmp_path_factory.mktemp("bounded")
    proc = ServerProcess(
        cache_dir=root / "cache", log_path=root / "bounded.log",
        extra_args=[*TEST_SERVER_ARGS, "--no-preload"],
        env={"FOUNDRY_LOCAL_MAX_LOADED_MODELS": "1"},
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-3000:]


# --- helpers -----------------------------------------------------------------------------------


def _get(proc: ServerProcess, path: str, **params: Any) -> httpx.Response:
    return httpx.get(proc.url(path), params=params, timeout=180)


def _loaded(proc: ServerProcess) -> dict[str, dict[str, Any]]:
    r = _get(proc, "/openai/loadedmodels")
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()}


def _load(proc: ServerProcess, name: str, **params: Any) -> dict[str, Any]:
    r = _get(proc, f"/openai/load/{name}", **params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loaded"] is True
    return dict(body)


def _unload_if_loaded(proc: ServerProcess, name: str) -> None:
    r = _get(proc, f"/openai/unload/{name}")
    assert r.status_code in (200, 404), r.text


def _chat(proc: ServerProcess, model: str = SMOLLM, **extra: Any) -> httpx.Response:
    return httpx.post(proc.url("/v1/chat/completions"), json=chat_body(model=model, max_tokens=4, **extra),
                      timeout=180)


def _complete(proc: ServerProcess, model: str, prompt: str = "The capital of France is") -> httpx.Response:
    return httpx.post(proc.url("/v1/completions"), timeout=180,
                      json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})


def _openai(proc: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=proc.url("/v1"), api_key="x", max_retries=0, timeout=180)


def _n_embd(path: Path) -> int:
    """The embedding width written in the GGUF's metadata (read independently of the engine)."""
    field = gguf.GGUFReader(path).fields["llama.embedding_length"]
    return int(field.parts[field.data[0]][0])


def _cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (
        math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


# --- several models, on demand, TTL, LRU ---------------------------------------------------------


def test_two_models_loaded_at_once(lab: ServerProcess) -> None:
    _load(lab, SMOLLM)
    _load(lab, GEMMA)
    loaded = _loaded(lab)
    assert {SMOL_ID, GEMMA_ID} <= set(loaded)
    assert loaded[SMOL_ID]["alias"] == SMOLLM and loaded[GEMMA_ID]["alias"] == GEMMA

    chat = _chat(lab)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    completion = _complete(lab, GEMMA)
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"]

    metrics = scrape(lab.base_url)
    for name, alias in ((SMOL_ID, SMOLLM), (GEMMA_ID, GEMMA)):
        entry = loaded[name]
        assert entry["engine"] == "llama.cpp" and entry["device"] == "cpu"
        assert metrics.get("foundry_local_model_loaded", model=alias, engine=entry["engine"],
                           device=entry["device"]) == 1
    assert set(_loaded(lab)) >= {SMOL_ID, GEMMA_ID}  # serving one did not evict the other


def test_request_loads_a_cached_model_on_demand(bounded: ServerProcess) -> None:
    assert _get(bounded, "/openai/unloadall").status_code == 200
    assert _loaded(bounded) == {}
    assert _get(bounded, "/health").json()["status"] == "ok"
    before = scrape(bounded.base_url)
    loads = before.get("foundry_local_model_load_seconds_count", model=SMOLLM)
    assert not before.has("foundry_local_model_loaded", model=SMOLLM)

    r = _chat(bounded)

    assert r.status_code == 200, r.text
    assert list(_loaded(bounded)) == [SMOL_ID]
    after = scrape(bounded.base_url)
    assert after.get("foundry_local_model_load_seconds_count", model=SMOLLM) == loads + 1
    assert after.get("foundry_local_model_loaded", model=SMOLLM) == 1
    assert _chat(bounded).status_code == 200  # served by the loaded model: no second load
    assert scrape(bounded.base_url).get("foundry_local_model_load_seconds_count", model=SMOLLM) == loads + 1


@pytest.mark.parametrize("already_loaded", [False, True], ids=["fresh", "already-loaded"])
def test_idle_ttl_unloads_and_next_request_reloads(lab: ServerProcess, already_loaded: bool) -> None:
    """``/openai/load/{name}?ttl=2`` unloads the model after ~2 s idle, whether the load call
    loaded it or found it loaded already (SmolLM2 was preloaded without a TTL)."""
    name, variant_id = (SMOLLM, SMOL_ID) if already_loaded else (GEMMA, GEMMA_ID)
    if already_loaded:
        _load(lab, name)
    else:
        _unload_if_loaded(lab, name)

    _load(lab, name, ttl=2)

    assert _loaded(lab)[variant_id]["ttl"] == 2
    assert poll(lambda: variant_id not in _loaded(lab), timeout=30, interval=0.25), _loaded(lab)
    r = _chat(lab) if name == SMOLLM else _complete(lab, name)
    assert r.status_code == 200, r.text
    assert variant_id in _loaded(lab)


def test_lru_eviction_under_a_bound_of_one(bounded: ServerProcess) -> None:
    assert _chat(bounded).status_code == 200
    assert list(_loaded(bounded)) == [SMOL_ID]

    _load(bounded, GEMMA)
    assert list(_loaded(bounded)) == [GEMMA_ID]
    metrics = scrape(bounded.base_url)
    assert metrics.has("foundry_local_model_loaded", model=GEMMA)
    assert not metrics.has("foundry_local_model_loaded", model=SMOLLM)

    r = _chat(bounded)
    assert r.status_code == 200, r.text
    assert list(_loaded(bounded)) == [SMOL_ID]
    assert _complete(bounded, GEMMA).status_code == 200
    assert list(_loaded(bounded)) == [GEMMA_ID]


def test_concurrent_loads_of_two_models_under_a_bound_of_one(bounded: ServerProcess) -> None:
    """Requests for two models arrive together: both are served, and the one owner of loading
    never has both in memory (its log shows an unload between any two loads)."""
    assert _get(bounded, "/openai/unloadall").status_code == 200
    start = len(bounded.log())
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(_chat, bounded)
        b = pool.submit(_complete, bounded, GEMMA)
        ra, rb = a.result(), b.result()
    assert ra.status_code == 200, ra.text
    assert rb.status_code == 200, rb.text
    assert len(_loaded(bounded)) == 1
    alive = peak = 0
    for line in bounded.log()[start:].splitlines():
        if re.search(r" loaded \S+ \(", line):
            alive += 1
        elif re.search(r" unloaded \S+", line):
            alive -= 1
        peak = max(peak, alive)
    assert peak == 1, bounded.log()[start:]


@pytest.mark.slow
def test_requests_using_a_model_outside_its_scheduler_hold_it(bounded: ServerProcess) -> None:
    """Embeddings and token counts use the engine outside its scheduler. With room for one model,
    completions for the other model arriving meanwhile wait for them instead of evicting the
    model (closing its llama.cpp context under a running call); every request is served and the
    server stays up."""
    assert _get(bounded, "/openai/unloadall").status_code == 200
    assert _chat(bounded).status_code == 200
    text = " ".join(f"Sentence {i} talks about libraries, rivers and small green boats." for i in range(40))

    def embed() -> httpx.Response:
        return httpx.post(bounded.url("/v1/embeddings"), json={"model": SMOLLM, "input": [text] * 2},
                          timeout=180)

    def count() -> httpx.Response:
        return httpx.post(bounded.url("/v1/chat/completions/tokenizer/encode/count"), timeout=180,
                          json=chat_body(model=SMOLLM, content=text))

    with ThreadPoolExecutor(6) as pool:
        futures = []
        for _ in range(2):
            futures += [pool.submit(embed), pool.submit(count), pool.submit(_complete, bounded, GEMMA)]
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * len(results), [r.text[:200] for r in results]
    counts = {r.json()["tokenCount"] for r in results if "tokenCount" in r.text}
    assert len(counts) == 1 and counts.pop() > 400
    assert _get(bounded, "/health").status_code == 200
    assert len(_loaded(bounded)) == 1


# --- unloading -----------------------------------------------------------------------------------


def test_unload_one_model(lab: ServerProcess) -> None:
    _load(lab, GEMMA)
    r = _get(lab, f"/openai/unload/{GEMMA}")
    assert r.status_code == 200, r.text
    assert r.json() == {"name": GEMMA_ID, "alias": GEMMA, "unloaded": True}
    assert GEMMA_ID not in _loaded(lab)
    assert not scrape(lab.base_url).has("foundry_local_model_loaded", model=GEMMA)
    assert_openai_error(_get(lab, f"/openai/unload/{GEMMA}"), 404, code="model_not_found")
    assert_openai_error(_get(lab, "/openai/unload/no-such-model"), 404, code="model_not_found")


def test_unloading_a_busy_model_needs_force(lab: ServerProcess) -> None:
    _load(lab, SMOLLM)
    body = chat_body("Tell me a very long story about a dragon.", max_tokens=1500, stream=True,
                     logit_bias=NO_EOS, temperature=0)
    raw = b""
    with httpx.Client(timeout=180) as c, c.stream("POST", lab.url("/v1/chat/completions"), json=body) as r:
        assert r.status_code == 200
        chunks = r.iter_bytes()
        while b'"content":"' not in raw.replace(b'"content":""', b""):  # a generated token arrived
            raw += next(chunks)

        refused = _get(lab, f"/openai/unload/{SMOLLM}")
        assert_openai_error(refused, 409, code="conflict")
        assert _loaded(lab)[SMOL_ID]["running"] == 1

        forced = _get(lab, f"/openai/unload/{SMOLLM}", force="true")
        assert forced.status_code == 200, forced.text
        for piece in chunks:  # the stream ends (it cannot run to its 1500 tokens)
            raw += piece

    assert sse_events(raw)[-1] == "[DONE]"
    events = [json.loads(e) for e in sse_events(raw) if e != "[DONE]"]
    finished = [c["choices"][0]["finish_reason"] for c in events if c.get("choices")]
    assert not any(reason in ("stop", "length") for reason in finished), finished[-3:]
    generated = sum(1 for c in events if c.get("choices") and c["choices"][0]["delta"].get("content"))
    assert 0 < generated < 1500
    # A forced unload says so: the stream ends with a 503 error event, not a silent truncation.
    errors = [c["error"] for c in events if "error" in c]
    assert len(errors) == 1 and "unloaded" in errors[0]["message"], errors
    assert errors[0]["code"] == "service_unavailable" and "request id" in errors[0]["message"]
    assert SMOL_ID not in _loaded(lab)
    assert lab.proc is not None and lab.proc.poll() is None
    assert _chat(lab).status_code == 200  # reloaded on demand
    assert SMOL_ID in _loaded(lab)


def test_unload_all(lab: ServerProcess) -> None:
    _load(lab, SMOLLM)
    _load(lab, GEMMA)
    r = _get(lab, "/openai/unloadall")
    assert r.status_code == 200, r.text
    assert r.json()["unloaded"] >= 2
    assert _loaded(lab) == {}
    assert not scrape(lab.base_url).has("foundry_local_model_loaded")
    assert _get(lab, "/health").json()["loaded"] == []
    assert _chat(lab).status_code == 200
    assert list(_loaded(lab)) == [SMOL_ID]


# --- downloads -----------------------------------------------------------------------------------


def _download(proc: ServerProcess, alias: str) -> list[str]:
    body = {"model": {"Name": alias, "Uri": f"https://huggingface.co/{SMOL_REPO}", "Publisher": "test",
                      "ProviderType": "HuggingFace", "PromptTemplate": None}}
    with httpx.stream("POST", proc.url("/openai/download"), json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        return [line for line in r.iter_lines() if line.strip()]


def test_download_streams_progress_then_success(lab: ServerProcess, hub: FakeHub) -> None:
    hub.reset()
    assert HUB_ID not in _get(lab, "/openai/models").json()
    before = scrape(lab.base_url).get("foundry_local_download_bytes_total", model=HUB_ALIAS)

    lines = _download(lab, HUB_ALIAS)

    assert json.loads(lines[-1]) == {"Success": True, "ErrorMessage": None}
    progress = lines[:-1]
    assert progress and all(line.startswith("Total ") and HUB_ID in line for line in progress), progress
    percents = [float(line.split()[1].rstrip("%")) for line in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert len(hub.gets(SMOL_FILE)) == 1

    assert HUB_ID in _get(lab, "/openai/models").json()
    metrics = scrape(lab.base_url)
    assert metrics.get("foundry_local_download_bytes_total", model=HUB_ALIAS) - before == SMOL_SIZE
    assert metrics.has("foundry_local_cache_size_bytes")
    assert metrics.get("foundry_local_cache_size_bytes") >= 0
    assert _load(lab, HUB_ALIAS)["name"] == HUB_ID
    r = _chat(lab, model=HUB_ALIAS)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]

    again = _download(lab, HUB_ALIAS)  # cached: succeeds without fetching the file again
    assert json.loads(again[-1]) == {"Success": True, "ErrorMessage": None}
    assert len(hub.gets(SMOL_FILE)) == 1


def test_download_with_a_flipped_byte_fails_cleanly(lab: ServerProcess, lab_root: Path, hub: FakeHub) -> None:
    hub.reset()
    hub.faults.flip_at = 12_345_678
    try:
        lines = _download(lab, PINNED_ALIAS)
    finally:
        hub.reset()

    final = json.loads(lines[-1])
    assert final["Success"] is False
    message = final["ErrorMessage"]
    assert isinstance(message, str) and message
    assert_no_leaks(message)
    assert str(lab_root) not in message and ".staging" not in message and ".incomplete" not in message
    assert PINNED_ID not in _get(lab, "/openai/models").json()
    assert_openai_error(_get(lab, f"/openai/load/{PINNED_ALIAS}"), 404, code="model_not_found")


def test_download_of_an_unknown_model_is_404(lab: ServerProcess) -> None:
    r = httpx.post(lab.url("/openai/download"), json={"model": {"Name": "no-such-model"}}, timeout=30)
    assert_openai_error(r, 404, code="model_not_found")
    r = httpx.post(lab.url("/openai/download"), json={"nothing": 1}, timeout=30)
    assert_openai_error(r, 400, param="model")


# --- provider fallback, ep ------------------------------------------------------------------------


def test_corrupt_preferred_variant_falls_back_to_the_next(lab: ServerProcess) -> None:
    report = {m["alias"]: m for m in _get(lab, "/foundry/hardware").json()["models"]}
    assert report[FALLBACK]["chosen"]["variant"] == BROKEN_ID  # really the preferred one
    assert "newer version" in report[FALLBACK]["chosen"]["reason"]
    assert scrape(lab.base_url).get("foundry_local_provider_fallbacks_total", model=FALLBACK) == 0

    r = _chat(lab, model=FALLBACK)

    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert GOOD_ID in _loaded(lab) and BROKEN_ID not in _loaded(lab)
    metrics = scrape(lab.base_url)
    assert metrics.get("foundry_local_provider_fallbacks_total", model=FALLBACK) == 1
    assert metrics.get("foundry_local_provider_fallbacks_total", model=FALLBACK,
                       failed_variant=BROKEN_ID) == 1
    assert _chat(lab, model=FALLBACK).status_code == 200  # loaded: no second fallback
    assert scrape(lab.base_url).get("foundry_local_provider_fallbacks_total", model=FALLBACK) == 1


def test_per_request_execution_provider(lab: ServerProcess) -> None:
    ok = _chat(lab, ep="cpu")
    assert ok.status_code == 200, ok.text
    assert _loaded(lab)[SMOL_ID]["executionProvider"] == "cpu"

    err = assert_openai_error(_chat(lab, ep="cuda"), 400, param="ep", type_="invalid_request_error")
    assert "CUDAExecutionProvider" in err["message"]
    assert_openai_error(_get(lab, f"/openai/load/{SMOLLM}", ep="cuda"), 400, param="ep")
    assert_openai_error(_chat(lab, ep="warp-drive"), 400, param="ep", code="invalid_ep")
    assert _chat(lab).status_code == 200  # the CPU model is still loaded and serving
    assert SMOL_ID in _loaded(lab)


# --- hardware and status --------------------------------------------------------------------------


def test_hardware_report_and_status(lab: ServerProcess, lab_root: Path) -> None:
    r = _get(lab, "/foundry/hardware")
    assert r.status_code == 200
    assert_no_leaks(r.text)
    assert str(lab_root) not in r.text
    report = r.json()
    cpu = report["inventory"]["cpu"]
    assert cpu["logical_cores"] > 0 and cpu["usable_cores"] > 0
    assert report["inventory"]["memory"]["total_bytes"] > 0
    catalog_aliases = {e["alias"] for e in _get(lab, "/foundry/list").json()}
    models = {m["alias"]: m for m in report["models"]}
    assert set(models) == catalog_aliases
    for model in models.values():
        assert (model["chosen"] is None) != (model["error"] is None), model
        for variant in model["variants"]:
            assert variant["reason"], variant
        if model["chosen"] is not None:
            assert model["chosen"]["reason"]
            assert model["chosen"]["variant"] in {v["id"] for v in model["variants"] if v["chosen"]}
    smol = models[SMOLLM]["chosen"]
    assert smol["variant"] == SMOL_ID and smol["cached"] is True and smol["engine_ep"] == "cpu"
    assert "cached" in smol["reason"]

    status = _get(lab, "/openai/status").json()
    assert status["Endpoints"] == [f"http://127.0.0.1:{lab.port}"]
    assert Path(status["ModelDirPath"]) == lab_root / "cache"
    assert status["Hardware"]["cpu"]["logical_cores"] > 0
    assert set(status["LoadedModels"]) == set(_loaded(lab))


# --- embeddings and token counting ----------------------------------------------------------------


SENTENCES = [
    ("The cat sat on the mat.", "A kitten was sitting on the rug."),
    ("I love eating pizza with cheese.", "Cheesy pizza is my favourite food."),
    ("Quarterly tax filings are due in April.", "The stock market crashed yesterday."),
]


def test_embeddings_via_the_openai_client(lab: ServerProcess) -> None:
    client = _openai(lab)
    texts = [s for pair in SENTENCES for s in pair]
    n_embd = _n_embd(smol_gguf_path())

    floats = client.embeddings.create(model=SMOLLM, input=texts, encoding_format="float")
    vectors = [d.embedding for d in sorted(floats.data, key=lambda d: d.index)]
    assert len(vectors) == len(texts) and all(len(v) == n_embd for v in vectors)
    for v in vectors:
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4)
    assert floats.usage.prompt_tokens > len(texts)
    # each sentence's nearest neighbour is the one written about the same thing
    for i, v in enumerate(vectors):
        others = [(j, _cosine(v, w)) for j, w in enumerate(vectors) if j != i]
        nearest = max(others, key=lambda t: t[1])[0]
        assert nearest == i ^ 1, (texts[i], texts[nearest], others)

    # base64: little-endian float32, the same vectors
    raw = client.embeddings.create(model=SMOLLM, input=texts[:2], encoding_format="base64")
    for d in raw.data:
        assert isinstance(d.embedding, str)
        decoded = struct.unpack(f"<{n_embd}f", base64.b64decode(d.embedding))
        assert max(abs(a - b) for a, b in zip(decoded, vectors[d.index], strict=True)) < 1e-6
    # the client's default (it asks for base64 and decodes it)
    default = client.embeddings.create(model=SMOLLM, input=texts[0])
    assert len(default.data[0].embedding) == n_embd
    assert max(abs(a - b) for a, b in zip(default.data[0].embedding, vectors[0], strict=True)) < 1e-6

    exact = client.embeddings.create(model=SMOLLM, input="hello", dimensions=n_embd, encoding_format="float")
    assert len(exact.data[0].embedding) == n_embd


def test_embedding_errors(lab: ServerProcess) -> None:
    body = {"model": SMOLLM, "input": "hi", "dimensions": 3}
    r = httpx.post(lab.url("/v1/embeddings"), json=body, timeout=60)
    err = assert_openai_error(r, 400, param="dimensions", type_="invalid_request_error")
    assert str(_n_embd(smol_gguf_path())) in err["message"]
    with pytest.raises(openai.NotFoundError) as info:
        _openai(lab).embeddings.create(model="no-such-model", input="hi")
    assert info.value.status_code == 404


@pytest.mark.parametrize("with_tools", [False, True], ids=["plain", "tools"])
def test_token_count_matches_prompt_tokens(lab: ServerProcess, with_tools: bool) -> None:
    body = chat_body("How many tokens is this question, roughly?", max_tokens=2)
    body["messages"].insert(0, {"role": "system", "content": "You answer briefly."})
    if with_tools:
        body["tools"] = [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    counted = httpx.post(lab.url("/v1/chat/completions/tokenizer/encode/count"), json=body, timeout=60)
    assert counted.status_code == 200, counted.text
    assert set(counted.json()) == {"tokenCount"}
    n = counted.json()["tokenCount"]
    served = httpx.post(lab.url("/v1/chat/completions"), json=body, timeout=180)
    assert served.status_code == 200, served.text
    assert n == served.json()["usage"]["prompt_tokens"] > 10
