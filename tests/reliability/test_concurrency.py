"""Concurrent streams (continuous batching): all complete, and greedy outputs equal the sequential ones."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.support.serving import SMOLLM, scrape

pytestmark = pytest.mark.slow

PROMPTS = [
    "Name a color.",
    "What is the capital of Italy?",
    "Say hello in French.",
    "List two fruits.",
    "What is 3 times 3?",
    "Name a planet.",
    "What animal barks?",
    "Give me a synonym for happy.",
]


def test_eight_concurrent_streams_match_sequential(det_client: openai.OpenAI, det_base_url: str) -> None:
    """Alone or among 8 gives the same tokens: the property of deterministic mode (the default
    shared KV pool does not promise it; tests/reliability/test_kv_pool.py covers the pool)."""
    client, base_url = det_client, det_base_url
    def one(prompt: str, stream: bool) -> tuple[str, str | None]:
        msgs = [{"role": "user", "content": prompt}]
        if not stream:
            r = client.chat.completions.create(model=SMOLLM, messages=msgs, max_tokens=24, temperature=0)
            return r.choices[0].message.content or "", r.choices[0].finish_reason
        chunks = list(
            client.chat.completions.create(
                model=SMOLLM, messages=msgs, max_tokens=24, temperature=0, stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    sequential = [one(p, False) for p in PROMPTS]

    peak = {"running": 0.0, "waiting": 0.0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            m = scrape(base_url)
            peak["running"] = max(peak["running"], m.get("foundry_local_requests_running", model=SMOLLM))
            peak["waiting"] = max(peak["waiting"], m.get("foundry_local_requests_waiting", model=SMOLLM))
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            concurrent = list(pool.map(lambda p: one(p, True), PROMPTS))
    finally:
        done.set()
        sampler.join()
    assert concurrent == sequential
    slots = httpx.get(base_url + "/v1/slots", timeout=10).json()["data"][0]["parallel"]
    # batched, never above the slot count (default: from cores and context, 8 on 2 cores)
    assert 2 <= peak["running"] <= slots, (peak, slots)
