"""ONNX variants against Foundry Local's own runtime (``scripts/bench.py --foundry-peer VENV``).

Benchmark-only, never part of the test suite. Our server runs the catalog variant over HTTP (as
its users call it); Foundry Local's runtime (``foundry-local-sdk`` from PyPI, installed into its
own virtual environment by ``scripts/foundry_peer_venv.sh``) runs the *same folder* in-process in
``scripts/foundry_peer_worker.py`` (its web service does not serve locally registered models).
Both get the same prompts, greedy, streamed, the same token counter (the model's tokenizer).

Reported for both: single-stream decode tok/s and TTFT (median of alternating rounds), aggregate
tok/s and TTFT p50/p95 at each concurrency, RSS after the run, and how many of the requests at
each level returned exactly the text the same prompt returns alone on that system.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from .load import PROMPTS, LevelResult, RequestResult, _one, _url, warm_up
from .run import machine
from .servers import ServerProcess, start_ours

ROOT = Path(__file__).resolve().parents[2]


class FoundryPeer:
    """The worker process in the peer's virtual environment."""

    def __init__(self, venv: Path, model_dir: Path, work: Path, log: Path) -> None:
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "python"), str(ROOT / "scripts" / "foundry_peer_worker.py"), str(model_dir),
             str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"the Foundry Local peer did not start; see {log}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the Foundry Local peer exited")
        data: dict[str, Any] = json.loads(line)
        return data

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def level(self, prompts: list[str], concurrency: int, max_tokens: int,
              count: Callable[[str], int]) -> LevelResult:
        reply = self.call(op="run", prompts=prompts, concurrency=concurrency, max_tokens=max_tokens)
        results = [RequestResult(ok=r["ok"], start=r["start"], first=r["first"], last=r["last"],
                                 text=r["text"], tokens=count(r["text"]) if r["text"] else 0,
                                 error=r["error"]) for r in reply["results"]]
        return LevelResult(concurrency, len(prompts), reply["wall_s"], results)

    def rss_bytes(self) -> int:
        return int(self.call(op="rss")["rss_bytes"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="quit")
                self.proc.wait(timeout=30)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _counter(model_dir: Path) -> Callable[[str], int]:
    """Tokens of a text by the model's own tokenizer (onnxruntime-genai's: the [onnx] extra)."""
    import onnxruntime_genai as og

    tok = og.Tokenizer(og.Model(str(model_dir)))
    tok.update_options(add_special_tokens="false")
    return lambda text: len(tok.encode(text))


def _resolve(model: str, cache_dir: Path | None) -> Path:
    from ..cache.catalog import Catalog
    from ..cache.store import ModelStore
    from ..config import Settings

    settings = Settings() if cache_dir is None else Settings(cache_dir=cache_dir)
    catalog = Catalog.load(settings.cache_dir / "catalog.json", settings.catalog_path)
    store = ModelStore(settings.cache_dir)
    entry, variant = catalog.lookup(model)
    if variant is None or variant.format != "onnx" or not store.is_available(entry, variant):
        raise SystemExit(f"'{model}' must name an ONNX variant that is in the cache (foundry-local convert)")
    return Path(store.resolve(entry, variant))


def _ours_level(url: str, model: str, prompts: list[str], c: int, *, max_tokens: int,
                count: Callable[[str], int]) -> LevelResult:
    async def go() -> LevelResult:
        sem = asyncio.Semaphore(c)
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=c + 2)) as client:
            async def task(p: str) -> RequestResult:
                async with sem:
                    return await _one(client, _url(url, "chat"), model, p, max_tokens, api_key=None)

            t0 = asyncio.get_running_loop().time()
            results = await asyncio.gather(*(task(p) for p in prompts))
            wall = asyncio.get_running_loop().time() - t0
        for r in results:
            r.tokens = count(r.text) if r.text else 0
        return LevelResult(c, len(prompts), wall, list(results))

    return asyncio.run(go())


def _decode(r: RequestResult) -> float | None:
    if not r.ok or r.first is None or r.last is None or r.last <= r.first or r.tokens < 2:
        return None
    return (r.tokens - 1) / (r.last - r.first)


def main(argv: list[str]) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="bench.py --foundry-peer", description=__doc__)
    ap.add_argument("--foundry-peer", type=Path, required=True, help="venv of scripts/foundry_peer_venv.sh")
    ap.add_argument("--model", required=True, help="an ONNX catalog variant id, already in the cache")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", default="4,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="single-stream rounds per system (128 tokens)")
    ap.add_argument("--log-dir", type=Path, default=Path(".bench-logs"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("server_args", nargs="*", help="extra arguments for our server (after --)")
    args = ap.parse_args(argv)
    console = Console()
    model_dir = _resolve(args.model, args.cache_dir)
    count = _counter(model_dir)
    levels = [int(c) for c in args.concurrency.split(",") if c]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    report: dict[str, Any] = {"machine": machine(), "model": args.model, "requests_per_level": args.requests,
                              "max_tokens": args.max_tokens, "n_threads": args.n_threads, "systems": {}}
    extra = [*args.server_args]
    if args.cache_dir is not None:
        extra += ["--cache-dir", str(args.cache_dir)]
    console.print("starting foundry-local-py and Foundry Local's runtime ...")
    ours: ServerProcess | None = None
    peer: FoundryPeer | None = None
    try:
        ours = start_ours(args.model, n_threads=args.n_threads, log_dir=args.log_dir, extra=extra)
        peer = FoundryPeer(args.foundry_peer, model_dir, args.log_dir / "foundry-peer-work",
                           args.log_dir / "foundry-peer.log")
        asyncio.run(warm_up(ours.base_url, args.model))
        peer.call(op="run", prompts=["Hello"], concurrency=1, max_tokens=8)
        url = ours.base_url

        def run_ours(ps: list[str], c: int, m: int) -> LevelResult:
            return _ours_level(url, args.model, ps, c, max_tokens=m, count=count)

        def run_peer(ps: list[str], c: int, m: int) -> LevelResult:
            assert peer is not None
            return peer.level(ps, c, m, count)

        systems: dict[str, Callable[[list[str], int, int], LevelResult]] = {
            "foundry-local-py": run_ours, "foundry-local-sdk": run_peer}
        single: dict[str, list[RequestResult]] = {n: [] for n in systems}
        for i in range(args.rounds):
            for name in (list(systems) if i % 2 == 0 else list(reversed(systems))):
                single[name] += systems[name]([PROMPTS[0]], 1, 128).results
        alone: dict[str, dict[str, str]] = {n: {} for n in systems}
        for name, fn in systems.items():
            for p in dict.fromkeys(prompts):
                alone[name][p] = fn([p], 1, args.max_tokens).results[0].text
        results: dict[str, list[dict[str, Any]]] = {n: [] for n in systems}
        for i, c in enumerate(levels):
            for name in (list(systems) if i % 2 == 0 else list(reversed(systems))):
                console.print(f"  {name}: concurrency {c}, {len(prompts)} requests ...")
                lv = systems[name](prompts, c, args.max_tokens)
                same = sum(1 for p, r in zip(prompts, lv.results, strict=True)
                           if r.ok and r.text == alone[name][p])
                results[name].append(lv.summary() | {"same_as_alone": same})
        for name in systems:
            rates = [x for x in (_decode(r) for r in single[name]) if x is not None]
            ttfts = [r.ttft for r in single[name] if r.ttft is not None]
            rss = ours.rss_bytes() if name == "foundry-local-py" else peer.rss_bytes()
            report["systems"][name] = {
                "single_decode_tps": round(statistics.median(rates), 1) if rates else None,
                "single_ttft_ms": round(statistics.median(ttfts) * 1000, 1) if ttfts else None,
                "levels": results[name], "rss_mb": round(rss / 2**20, 1),
            }
    finally:
        if ours is not None:
            ours.stop()
        if peer is not None:
            peer.stop()
    _print(report, console)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _print(report: dict[str, Any], console: Console) -> None:
    s = report["systems"]
    a, b = "foundry-local-py", "foundry-local-sdk"
    console.print(f"\n[bold]{report['model']}[/]: ours over HTTP vs Foundry Local's runtime in-process; "
                  f"{report['requests_per_level']} requests/level, "
                  f"max_tokens {report['max_tokens']}, greedy, "
                  f"stream; {report['machine']}")

    def ratio(x: float | None, y: float | None) -> str:
        return "-" if x is None or not y else f"{x / y:.2f}x"

    table = Table()
    for col in ("metric", a, b, "ours / peer"):
        table.add_column(col, justify="right")
    table.add_row("single-stream decode tok/s", str(s[a]["single_decode_tps"]),
                  str(s[b]["single_decode_tps"]),
                  ratio(s[a]["single_decode_tps"], s[b]["single_decode_tps"]))
    table.add_row("single-stream TTFT ms", str(s[a]["single_ttft_ms"]), str(s[b]["single_ttft_ms"]),
                  ratio(s[a]["single_ttft_ms"], s[b]["single_ttft_ms"]))
    for la, lb in zip(s[a]["levels"], s[b]["levels"], strict=True):
        c = la["concurrency"]
        table.add_row(f"c={c} aggregate tok/s", str(la["aggregate_tps"]), str(lb["aggregate_tps"]),
                      ratio(la["aggregate_tps"], lb["aggregate_tps"]))
        table.add_row(f"c={c} TTFT p50 / p95 ms", f"{la['ttft_p50_ms']} / {la['ttft_p95_ms']}",
                      f"{lb['ttft_p50_ms']} / {lb['ttft_p95_ms']}",
                      ratio(la["ttft_p50_ms"], lb["ttft_p50_ms"]))
        table.add_row(f"c={c} TTFT p95/p50", ratio(la["ttft_p95_ms"], la["ttft_p50_ms"]),
                      ratio(lb["ttft_p95_ms"], lb["ttft_p50_ms"]), "")
        table.add_row(f"c={c} same as alone", f"{la['same_as_alone']}/{la['requests']}",
                      f"{lb['same_as_alone']}/{lb['requests']}", "")
        table.add_row(f"c={c} errors", str(la["errors"]), str(lb["errors"]), "")
    table.add_row("RSS after the run MiB", str(s[a]["rss_mb"]), str(s[b]["rss_mb"]),
                  ratio(s[a]["rss_mb"], s[b]["rss_mb"]))
    console.print(table)
