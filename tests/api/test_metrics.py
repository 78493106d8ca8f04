"""GET /metrics: every series the issue names, labelled by model, moving with real traffic by
exactly the tokens served."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.support.serving import SMOLLM, poll, scrape

pytestmark = pytest.mark.slow

CHAT = "/v1/chat/completions"
P = "foundry_local_"


def test_exposition_format(http: httpx.Client) -> None:
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    for name, kind in [
        ("requests_total", "counter"),
        ("request_duration_seconds", "histogram"),
        ("time_to_first_token_seconds", "histogram"),
        ("inter_token_latency_seconds", "histogram"),
        ("prompt_tokens_total", "counter"),
        ("generation_tokens_total", "counter"),
        ("requests_running", "gauge"),
        ("requests_waiting", "gauge"),
        ("model_loaded", "gauge"),
    ]:
        assert f"# TYPE {P}{name} {kind}" in r.text, name


def test_model_loaded_gauge(base_url: str) -> None:
    m = scrape(base_url)
    assert m.get(P + "model_loaded", model=SMOLLM, engine="llama.cpp", device="cpu") == 1
    assert m.get(P + "requests_running", model=SMOLLM) == 0
    assert m.get(P + "requests_waiting", model=SMOLLM) == 0


def _snapshot(base_url: str, endpoint: str) -> dict[str, float]:
    m = scrape(base_url)
    return {
        "ok": m.get(P + "requests_total", model=SMOLLM, endpoint=endpoint, status="200"),
        "duration": m.get(P + "request_duration_seconds_count", model=SMOLLM, endpoint=endpoint),
        "duration_sum": m.get(P + "request_duration_seconds_sum", model=SMOLLM, endpoint=endpoint),
        "ttft": m.get(P + "time_to_first_token_seconds_count", model=SMOLLM),
        "itl": m.get(P + "inter_token_latency_seconds_count", model=SMOLLM),
        "prompt": m.get(P + "prompt_tokens_total", model=SMOLLM),
        "gen": m.get(P + "generation_tokens_total", model=SMOLLM),
    }


@pytest.mark.parametrize("stream", [False, True])
def test_counters_grow_by_tokens_served(client: openai.OpenAI, base_url: str, stream: bool) -> None:
    before = _snapshot(base_url, CHAT)
    msgs = [{"role": "user", "content": "Tell me about the moon."}]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=SMOLLM,
                messages=msgs,
                max_tokens=7,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        usage = chunks[-1].usage
    else:
        usage = client.chat.completions.create(model=SMOLLM, messages=msgs, max_tokens=7, temperature=0).usage
    after = _snapshot(base_url, CHAT)
    assert usage.completion_tokens == 7
    assert after["ok"] == before["ok"] + 1
    assert after["duration"] == before["duration"] + 1
    assert after["duration_sum"] > before["duration_sum"]
    assert after["ttft"] == before["ttft"] + 1
    assert after["itl"] == before["itl"] + usage.completion_tokens - 1
    assert after["prompt"] == before["prompt"] + usage.prompt_tokens
    assert after["gen"] == before["gen"] + usage.completion_tokens


def test_completions_counted_per_endpoint(client: openai.OpenAI, base_url: str) -> None:
    ep = "/v1/completions"
    before = _snapshot(base_url, ep)
    r = client.completions.create(model=SMOLLM, prompt=["One", "Two"], max_tokens=3, temperature=0)
    after = _snapshot(base_url, ep)
    assert after["ok"] == before["ok"] + 1
    assert after["gen"] == before["gen"] + r.usage.completion_tokens == before["gen"] + 6
    assert after["prompt"] == before["prompt"] + r.usage.prompt_tokens


def test_running_gauge_follows_a_stream(base_url: str) -> None:
    body = {
        "model": SMOLLM,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 300,
        "temperature": 0,
        "stream": True,
    }
    with httpx.Client(base_url=base_url, timeout=120) as c, c.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()
        next(lines)
        assert scrape(base_url).get(P + "requests_running", model=SMOLLM) == 1
        assert [ln for ln in lines if ln][-1] == "data: [DONE]"
    assert poll(lambda: scrape(base_url).get(P + "requests_running", model=SMOLLM) == 0, 30)
