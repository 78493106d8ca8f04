"""A bounded streaming load against any OpenAI-compatible ``/v1/chat/completions``.

Each level sends ``requests`` chat requests with at most ``concurrency`` in flight, streaming,
and records per request: time to the first content token, the time of the last one, the text.
Output tokens are counted by re-tokenizing the text with the model's own tokenizer, so systems
that report usage differently (or not at all) are counted the same way.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms, in simple words.",
    "List some tips for learning a new language.",
    "Describe a busy market in the morning.",
    "What makes a good friend? Answer in a paragraph.",
    "Write a poem about autumn leaves.",
    "Explain what a computer does, for a child.",
    "Give advice to someone starting to run.",
    "Describe the ocean to someone who has never seen it.",
    "Write a letter thanking a teacher.",
    "Explain why the sky is blue.",
    "Tell me about a day in the life of a cat.",
    "Describe how to make a cup of tea.",
    "Write a short dialogue between two robots.",
    "Explain the water cycle.",
    "What are the benefits of reading books?",
)


@dataclass
class RequestResult:
    ok: bool
    start: float
    first: float | None = None
    last: float | None = None
    text: str = ""
    tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.start


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if not r.ok)

    @property
    def output_tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def aggregate_tps(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def ttft_ms(self, q: float) -> float | None:
        values = sorted(r.ttft for r in self.ok if r.ttft is not None)
        if not values:
            return None
        idx = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
        return values[idx] * 1000

    @property
    def per_stream_tps(self) -> float | None:
        rates = [
            (r.tokens - 1) / (r.last - r.first)
            for r in self.ok
            if r.first is not None and r.last is not None and r.last > r.first and r.tokens > 1
        ]
        return statistics.mean(rates) if rates else None

    def summary(self) -> dict[str, float | int | None]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "output_tokens": self.output_tokens,
            "wall_s": round(self.wall_s, 3),
            "aggregate_tps": round(self.aggregate_tps, 1),
            "per_stream_tps": None if self.per_stream_tps is None else round(self.per_stream_tps, 1),
            "ttft_p50_ms": _r(self.ttft_ms(0.5)),
            "ttft_p95_ms": _r(self.ttft_ms(0.95)),
            "empty_responses": sum(1 for r in self.ok if r.tokens == 0),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


async def _one(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, *,
    api_key: str | None, messages: list[dict[str, str]] | None = None,
) -> RequestResult:
    """One streamed request; ``url`` ends in /chat/completions or /completions (``messages``: a
    whole conversation instead of one user ``prompt``)."""
    body: dict[str, object] = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    if url.endswith("/chat/completions"):
        body["messages"] = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    res = RequestResult(ok=False, start=time.perf_counter())
    # Only timestamp raw bytes while streaming; split and parse afterwards, so the client's own CPU
    # use (same machine, two cores) stays out of the measurement as much as possible.
    arrivals: list[tuple[float, bytes]] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}"
                await resp.aread()
                return res
            async for data in resp.aiter_raw():
                arrivals.append((time.perf_counter(), data))
        res.ok = True
    except httpx.HTTPError as exc:
        res.error = type(exc).__name__
    parts: list[str] = []
    pending = b""
    for when, data in arrivals:
        pending += data
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                res.ok = False
                res.error = str(chunk["error"].get("message"))[:200]
                continue
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content") or choice.get("text")
                if content:
                    if res.first is None:
                        res.first = when
                    res.last = when
                    parts.append(content)
    res.text = "".join(parts)
    return res


async def run_level(
    base_url: str,
    model: str,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    count_tokens: Callable[[str], int],
    api_key: str | None = None,
    timeout_s: float = 600.0,
    api: str = "chat",
    unique_prompts: bool = False,
    models: Sequence[str] = (),
) -> LevelResult:
    """``models``: request i names ``models[i % len(models)]`` (a mix); empty: ``model``."""
    url = _url(base_url, api)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def task(i: int) -> RequestResult:
            async with sem:
                prompt = PROMPTS[i % len(PROMPTS)]
                if unique_prompts:
                    prompt = f"{prompt} (ref {secrets.token_hex(3)})"
                name = models[i % len(models)] if models else model
                return await _one(client, url, name, prompt, max_tokens, api_key=api_key)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(requests)))
        wall = time.perf_counter() - t0
    for r in results:
        r.tokens = count_tokens(r.text) if r.text else 0
    return LevelResult(concurrency, requests, wall, list(results))


def _url(base_url: str, api: str) -> str:
    return base_url.rstrip("/") + ("/chat/completions" if api == "chat" else "/completions")


async def warm_up(base_url: str, model: str, api_key: str | None = None, api: str = "chat") -> None:
    async with httpx.AsyncClient(timeout=300) as client:
        await _one(client, _url(base_url, api), model, "Hello", 8, api_key=api_key)


async def single_stream_tps(
    base_url: str, model: str, *, max_tokens: int, count_tokens: Callable[[str], int],
    api_key: str | None = None, prompt: str = PROMPTS[0], api: str = "chat",
) -> float:
    """Decode tokens/s of one request alone (first content token to last), as a client sees it."""
    async with httpx.AsyncClient(timeout=600) as client:
        r = await _one(client, _url(base_url, api), model, prompt, max_tokens, api_key=api_key)
    if not r.ok or r.first is None or r.last is None or r.last <= r.first:
        return 0.0
    return (count_tokens(r.text) - 1) / (r.last - r.first)
