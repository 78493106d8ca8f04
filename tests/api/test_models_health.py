"""GET /v1/models, /v1/models/{id}, /health (200 ready, 503 while loading)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.support.serving import GEMMA_VARIANT, SMOLLM, assert_openai_error

pytestmark = pytest.mark.slow


def test_models_list(client: openai.OpenAI, http: httpx.Client) -> None:
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert SMOLLM in ids
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list"
    card = next(m for m in raw["data"] if m["id"] == SMOLLM)
    assert card["object"] == "model"
    assert card["owned_by"] == "HuggingFaceTB"
    assert card["loaded"] is True and card["engine"] == "llama.cpp" and card["device"] == "cpu"
    assert isinstance(card["context_length"], int) and card["context_length"] >= 512


def test_model_retrieve(client: openai.OpenAI, http: httpx.Client) -> None:
    m = client.models.retrieve(SMOLLM)
    assert m.id == SMOLLM and m.object == "model"
    variant = http.get("/v1/models").json()["data"][0]["variant"]
    r = http.get(f"/v1/models/{variant}")
    assert r.status_code == 200 and r.json()["id"] == variant


@pytest.mark.parametrize("name", ["no-such-model", "..%2F..%2Fetc", "smollm2-135m:7"])
def test_model_retrieve_unknown(http: httpx.Client, name: str) -> None:
    assert_openai_error(http.get(f"/v1/models/{name}"), 404, code="model_not_found")


def test_health_ready(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert any(v.startswith("smollm2-135m") for v in body["loaded"])


def test_health_503_while_loading(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A server preloading a model answers /health with 503 until the model is in, then 200.

    Preloading gemma3-270m on a fresh cache assembles and verifies 253 MB before loading, a window
    of seconds."""
    proc = server_factory("--model", GEMMA_VARIANT, wait=False)
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()[-2000:]
        try:
            r = httpx.get(proc.url("/health"), timeout=5)
        except httpx.HTTPError:
            time.sleep(0.02)
            continue
        seen.append((r.status_code, r.json()["status"]))
        if r.status_code == 200:
            break
        time.sleep(0.02)
    assert seen and seen[-1] == (200, "ok"), seen[-5:]
    assert (503, "loading") in seen, f"never saw 503 while loading: {seen[:5]}"
    assert all(s == (503, "loading") for s in seen[:-1]), seen
    loaded = httpx.get(proc.url("/health")).json()["loaded"]
    assert loaded == [f"{GEMMA_VARIANT}:1"]
