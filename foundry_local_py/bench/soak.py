"""Soak test: many mixed requests at once against one server, some clients leaving mid-way.

``scripts/soak`` (or ``python -m foundry_local_py.bench.soak``) starts a server on 127.0.0.1 (or
uses ``--url``, which must be a loopback address), sends ``--requests`` requests (chat streamed
and not, completions, embeddings, tools, json_schema) from ``--concurrency`` clients, of which a
fraction (``--disconnect``) leave at a random point, then checks the server is back to rest:

- no 5xx (seen by the clients, and in the server's request counter);
- nothing left running: the running gauge is 0, every slot of ``/v1/slots`` is idle, no queue;
- RSS growth after warm-up under ``--rss-limit-mb`` (50) plus the server's host prompt cache bound
  (``--prompt-cache-mib``, the server's default 256): that cache fills up to its bound as distinct
  sequences finish, which is growth, bounded, not a leak. So also: over the last 30% of the run
  (the cache full by then) RSS grows less than ``--rss-limit-mb``: a leak keeps climbing.
  ``--prompt-cache-mib 0`` runs the server without the cache and checks the 50 MB alone;
- the generation-token counter equals the tokens the completed requests reported in ``usage``,
  plus at most ``max_tokens`` for each request whose client left (the server counts the tokens it
  generated for them; the client cannot know how many those were).

It prints a JSON report and exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import psutil

MODEL = "smollm2-135m"
KINDS = ("chat", "chat_stream", "completion", "completion_stream", "embedding", "tools", "json_schema")
PROMPTS = [
    "Name three colors.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello in French.",
    "List two fruits.", "Describe the sea in one sentence.", "Count from one to five.",
    "What day comes after Monday?",
]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["answer"]}


@dataclass
class Result:
    kind: str
    status: int | None = None
    outcome: str = "completed"  # completed | disconnected | error
    completion_tokens: int = 0
    prompt_tokens: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class Report:
    requests: int
    concurrency: int
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    client_5xx: int = 0
    server_5xx: int = 0
    running_after: float = -1
    waiting_after: float = -1
    busy_slots_after: int = -1
    rss_warm_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_samples_mb: dict[int, float] = field(default_factory=dict)
    """RSS after n requests: a leak keeps climbing, a bounded cache levels off."""
    rss_tail_growth_mb: float = 0.0
    """RSS growth over the last 30% of the requests."""
    prompt_cache_mib: int = 0
    completed_completion_tokens: int = 0
    disconnected: int = 0
    counter_generation_tokens: float = 0.0
    counter_excess_tokens: float = 0.0
    excess_bound_tokens: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _body(kind: str, rng: random.Random, max_tokens: int) -> tuple[str, dict[str, Any]]:
    prompt = rng.choice(PROMPTS)
    mt = rng.randint(max(1, max_tokens // 2), max_tokens)
    chat: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": mt, "temperature": rng.choice([0, 0.7])}
    if kind == "chat":
        return "/v1/chat/completions", chat
    if kind == "chat_stream":
        return "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "completion":
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": mt}
    if kind == "completion_stream":
        return "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": mt, "stream": True,
                                   "stream_options": {"include_usage": True}}
    if kind == "embedding":
        return "/v1/embeddings", {"model": MODEL, "input": [prompt, rng.choice(PROMPTS)]}
    if kind == "tools":
        return "/v1/chat/completions", {**chat, "messages": [
            {"role": "user", "content": "What is the weather in Paris?"}], "tools": [TOOL],
            "tool_choice": rng.choice(["auto", "required"]), "max_tokens": max(mt, 24)}
    return "/v1/chat/completions", {**chat, "max_tokens": max(mt, 24), "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}


async def _one(client: httpx.AsyncClient, kind: str, rng: random.Random, *, leave: bool,  # noqa: PLR0912
               max_tokens: int) -> Result:
    path, body = _body(kind, rng, max_tokens)
    res = Result(kind)
    started = time.monotonic()
    try:
        if body.get("stream"):
            leave_after = rng.randint(0, 6) if leave else -1
            async with client.stream("POST", path, json=body) as r:
                res.status = r.status_code
                events = 0
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events += 1
                    if events == leave_after:
                        res.outcome = "disconnected"
                        break  # leaving the block drops the connection mid-stream
                    payload = line[len("data: "):]
                    if payload == "[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if "error" in chunk:
                        res.outcome, res.error = "error", str(chunk["error"].get("code"))
                    elif chunk.get("usage"):
                        res.completion_tokens = chunk["usage"]["completion_tokens"]
                        res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if r.status_code >= 400 and res.outcome == "completed":
                    res.outcome = "error"
        else:
            call = client.post(path, json=body)
            if leave:
                try:
                    r = await asyncio.wait_for(call, rng.uniform(0.005, 1.0))
                except asyncio.TimeoutError:
                    res.outcome = "disconnected"
                    return res
            else:
                r = await call
            res.status = r.status_code
            data = r.json()
            if r.status_code >= 400:
                res.outcome, res.error = "error", str(data.get("error", {}).get("code"))
            elif "usage" in data and data["usage"] is not None:
                res.completion_tokens = data["usage"].get("completion_tokens", 0) or 0
                res.prompt_tokens = data["usage"].get("prompt_tokens", 0) or 0
    except (httpx.HTTPError, ValueError) as exc:
        res.outcome, res.error = "error", type(exc).__name__
    finally:
        res.seconds = time.monotonic() - started
    return res


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, rest = head.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += float(value)
    return total


def _five_xx(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("foundry_local_requests_total{") and 'status="5' in line:
            total += float(line.rpartition(" ")[2])
    return total


async def soak(base_url: str, *, requests: int, concurrency: int, disconnect: float, seed: int,  # noqa: PLR0915
               max_tokens: int, pid: int | None, rss_limit_mb: float = 50.0,
               kinds: tuple[str, ...] = KINDS, warmup: int | None = None,
               prompt_cache_mib: int = 0) -> Report:
    """Run the soak against ``base_url`` (the server's process id for RSS, when known;
    ``prompt_cache_mib``: the server's host prompt cache bound, allowed on top of the growth)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible load, not secrets
    report = Report(requests, concurrency, prompt_cache_mib=prompt_cache_mib)
    plan = [(rng.choice(kinds), rng.random() < disconnect, random.Random(rng.random()))  # noqa: S311
            for _ in range(requests)]
    warmup = warmup if warmup is not None else max(concurrency, requests // 10)
    proc = psutil.Process(pid) if pid else None
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        before = (await client.get("/metrics")).text
        # warm-up: every kind once, all the way, so caches and arenas reach their working size
        for kind in kinds:
            await _one(client, kind, random.Random(seed), leave=False,  # noqa: S311
                       max_tokens=max_tokens)
        before = (await client.get("/metrics")).text
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(plan)):
            queue.put_nowait(i)
        done = 0
        rss_warm: list[float] = []

        async def worker() -> None:
            nonlocal done
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                kind, leave, r = plan[i]
                results.append(await _one(client, kind, r, leave=leave, max_tokens=max_tokens))
                done += 1
                tail_start = requests - (3 * requests) // 10
                if proc is not None and (done in (warmup, tail_start) or done % max(1, requests // 10) == 0):
                    rss = round(proc.memory_info().rss / 2**20, 1)
                    report.rss_samples_mb[done] = rss
                    if done == warmup:
                        rss_warm.append(rss)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        report.seconds = round(time.monotonic() - started, 1)
        # at rest: cancelled generations stop within a decode step or two
        deadline = time.monotonic() + 15
        while True:
            after = (await client.get("/metrics")).text
            slots = (await client.get("/v1/slots")).json()["data"]
            running = _metric(after, "foundry_local_requests_running")
            waiting = _metric(after, "foundry_local_requests_waiting")
            busy = sum(1 for m in slots for s in m["slots"] if s["state"] != "idle")
            if (running == 0 and waiting == 0 and busy == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    report.running_after, report.waiting_after, report.busy_slots_after = running, waiting, busy
    report.outcomes = dict(Counter(r.outcome for r in results))
    report.by_kind = dict(Counter(r.kind for r in results))
    report.statuses = dict(Counter(str(r.status) for r in results))
    report.client_5xx = sum(1 for r in results if r.status is not None and r.status >= 500)
    report.server_5xx = int(_five_xx(after) - _five_xx(before))
    report.disconnected = report.outcomes.get("disconnected", 0)
    report.completed_completion_tokens = sum(r.completion_tokens for r in results if r.outcome == "completed")
    counted = (_metric(after, "foundry_local_generation_tokens_total", model=MODEL)
               - _metric(before, "foundry_local_generation_tokens_total", model=MODEL))
    report.counter_generation_tokens = counted
    report.counter_excess_tokens = counted - report.completed_completion_tokens
    report.excess_bound_tokens = report.disconnected * max(max_tokens, 24)
    if proc is not None:
        report.rss_warm_mb = round(rss_warm[0] if rss_warm else proc.memory_info().rss / 2**20, 1)
        report.rss_end_mb = round(proc.memory_info().rss / 2**20, 1)
        report.rss_growth_mb = round(report.rss_end_mb - report.rss_warm_mb, 1)
        tail_start = requests - (3 * requests) // 10
        if tail_start in report.rss_samples_mb:
            report.rss_tail_growth_mb = round(report.rss_end_mb - report.rss_samples_mb[tail_start], 1)
    f = report.failures
    if report.client_5xx or report.server_5xx:
        f.append(f"5xx: {report.client_5xx} seen by clients, {report.server_5xx} counted by the server")
    errors = [r for r in results if r.outcome == "error"]
    if errors:
        common = Counter((r.kind, r.status, r.error) for r in errors).most_common(5)
        f.append(f"{len(errors)} errors: {common}")
    if running or waiting or busy:
        f.append(f"not at rest: running {running}, waiting {waiting}, busy slots {busy}")
    bound = rss_limit_mb + prompt_cache_mib * 1.048576  # MiB -> MB
    if proc is not None and report.rss_growth_mb > bound:
        f.append(f"RSS grew {report.rss_growth_mb} MB after warm-up (limit {rss_limit_mb} MB + a "
                 f"{prompt_cache_mib} MiB prompt cache)")
    if proc is not None and report.rss_tail_growth_mb > rss_limit_mb:
        f.append(f"RSS still climbing: +{report.rss_tail_growth_mb} MB over the last 30% of the run")
    if report.counter_excess_tokens < 0:
        f.append(f"token counter {counted} < tokens the completed requests received "
                 f"({report.completed_completion_tokens})")
    if report.counter_excess_tokens > report.excess_bound_tokens:
        f.append(f"token counter exceeds completed tokens by {report.counter_excess_tokens}, more than "
                 f"{report.disconnected} disconnected requests could have generated")
    if report.disconnected == 0 and report.counter_excess_tokens != 0:
        f.append("no client left, yet the token counter differs from the clients' usage")
    return report


# --- a server of its own ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Any:
    port = _free_port()
    cache = tempfile.mkdtemp(prefix="soak-cache-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    env["FOUNDRY_LOCAL_PROMPT_CACHE_MIB"] = str(args.prompt_cache_mib)
    env.update(item.split("=", 1) for item in args.server_env)
    cmd = [sys.executable, "-m", "foundry_local_py.cli.main", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--cache-dir", cache, *args.server_arg]
    log = open(Path(cache) / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server on a loopback address (default: start one)")
    p.add_argument("--pid", type=int, help="its process id, for RSS (with --url)")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disconnect", type=float, default=0.2, help="fraction of clients that leave")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-limit-mb", type=float, default=50.0)
    p.add_argument("--prompt-cache-mib", type=int, default=256,
                   help="the server's host prompt cache (set on the server it starts) [256]")
    p.add_argument("--json", type=Path, help="also write the report here")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the server it starts (repeat)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra flag for the server it starts (repeat), e.g. --server-arg=--n-threads=2")
    args = p.parse_args(argv)
    if args.url and not _loopback(args.url):
        p.error("the soak only runs against a loopback address")

    async def run(url: str, pid: int | None) -> Report:
        return await soak(url, requests=args.requests, concurrency=args.concurrency,
                          disconnect=args.disconnect, seed=args.seed, max_tokens=args.max_tokens,
                          pid=pid, rss_limit_mb=args.rss_limit_mb, prompt_cache_mib=args.prompt_cache_mib)

    if args.url:
        report = asyncio.run(run(args.url.rstrip("/"), args.pid))
    else:
        with _server(args) as (url, pid):
            report = asyncio.run(run(url, pid))
    text = json.dumps({**asdict(report), "ok": report.ok}, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
