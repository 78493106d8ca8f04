"""The benchmark driver behind ``foundry-local bench`` and ``scripts/bench.py``."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .load import LevelResult, run_level, single_stream_tps, warm_up
from .servers import ServerProcess, start_llama_cpp_server, start_ours


@dataclass
class BenchConfig:
    model: str = "smollm2-135m"
    base_url: str | None = None
    gguf: Path | None = None
    requests: int = 16
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 8])
    max_tokens: int = 64
    vs_peer: bool = False
    ceiling: bool = True
    n_threads: int = 2
    n_ctx: int = 4096
    api_key: str | None = None
    json_path: Path | None = None
    api: str = "chat"
    """'chat' (/v1/chat/completions) or 'completions' (base models without a chat template)."""
    pairs: int = 6
    """Single-stream rounds, each paired with a ceiling measurement right before it."""
    log_dir: Path = Path(".bench-logs")
    server_args: list[str] = field(default_factory=list)
    baseline: Path | None = None
    """Another checkout of this project (e.g. a worktree of an older commit), benched in the same
    run as a third system named 'baseline': before/after ratios from one run."""
    unique_prompts: bool = False
    """Add a random tag to each prompt, so no request repeats an earlier one (every level sends
    the same 16 prompts otherwise, which a server with a prompt cache has seen before)."""


def resolve_gguf(model: str) -> Path:
    """The GGUF file the catalog gives ``model`` on this machine (for the peer and the ceiling)."""
    from ..cache.catalog import Catalog
    from ..cache.store import ModelStore
    from ..config import Settings

    settings = Settings()
    catalog = Catalog.load(settings.cache_dir / "catalog.json", settings.catalog_path)
    store = ModelStore(settings.cache_dir)
    entry, fixed = catalog.lookup(model)
    variants = [fixed] if fixed else [v for v in entry.variants if v.format == "gguf"]
    for v in variants:
        if v is not None and v.format == "gguf" and store.is_available(entry, v):
            return store.resolve(entry, v)
    raise SystemExit(f"no GGUF variant of '{model}' is available locally; pass --gguf")


def token_counter(gguf: Path) -> Callable[[str], int]:
    from llama_cpp import Llama

    vocab = Llama(str(gguf), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    return count


def machine() -> str:
    import os

    import psutil

    return (f"{platform.machine()}, {os.cpu_count()} logical cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, {platform.system()} {platform.release()}")


def run(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    gguf = cfg.gguf or (resolve_gguf(cfg.model) if (cfg.vs_peer or cfg.ceiling or not cfg.base_url) else None)
    count = token_counter(gguf) if gguf else (lambda text: len(text.split()))
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "model": cfg.model, "api": cfg.api, "gguf": gguf.name if gguf else None,
        "requests_per_level": cfg.requests, "unique_prompts": cfg.unique_prompts,
        "max_tokens": cfg.max_tokens, "n_threads": cfg.n_threads, "systems": {},
    }
    ceiling = None
    if cfg.ceiling and gguf:
        from .ceiling import DecodeCeiling

        ceiling = DecodeCeiling(gguf, n_threads=cfg.n_threads)
        report["ceiling_decode_tps"] = round(max(ceiling.measure() for _ in range(3)), 1)

    servers: list[ServerProcess] = []
    targets: list[tuple[str, str, str]] = []  # (name, base_url, model name to send)
    try:
        if cfg.base_url:
            targets.append(("target", cfg.base_url, cfg.model))
        else:
            console.print("starting foundry-local-py ...")
            ours = start_ours(cfg.model, n_threads=cfg.n_threads, log_dir=cfg.log_dir,
                              extra=cfg.server_args)
            servers.append(ours)
            targets.append(("foundry-local-py", ours.base_url, cfg.model))
        if cfg.baseline is not None:
            console.print(f"starting the baseline from {cfg.baseline} ...")
            base = start_ours(cfg.model, n_threads=cfg.n_threads, log_dir=cfg.log_dir,
                              extra=cfg.server_args, name="baseline", source=cfg.baseline)
            servers.append(base)
            targets.append(("baseline", base.base_url, cfg.model))
        if cfg.vs_peer:
            assert gguf is not None
            console.print("starting llama_cpp.server (the peer) ...")
            peer = start_llama_cpp_server(gguf, n_threads=cfg.n_threads, n_ctx=cfg.n_ctx, log_dir=cfg.log_dir)
            servers.append(peer)
            targets.append(("llama_cpp.server", peer.base_url, "peer"))
        for _, url, model in targets:
            asyncio.run(warm_up(url, model, cfg.api_key, cfg.api))
        if ceiling is not None and cfg.pairs > 0:
            console.print(f"single stream vs the in-process ceiling, {cfg.pairs} alternating pairs ...")
            report["single_stream_vs_ceiling"] = _paired(cfg, ceiling, targets, count)
        results: dict[str, list[LevelResult]] = {name: [] for name, _, _ in targets}
        for i, c in enumerate(cfg.concurrency):
            # Alternate who goes first at each level so drift does not favour one system.
            order = targets if i % 2 == 0 else list(reversed(targets))
            for name, url, model in order:
                console.print(f"  {name}: concurrency {c}, {cfg.requests} requests ...")
                level = asyncio.run(run_level(url, model, concurrency=c, requests=cfg.requests,
                                              max_tokens=cfg.max_tokens, count_tokens=count,
                                              api_key=cfg.api_key, api=cfg.api,
                                              unique_prompts=cfg.unique_prompts))
                results[name].append(level)
        for name, levels in results.items():
            proc = next((s for s in servers if s.name == name), None)
            report["systems"][name] = {
                "levels": [lv.summary() for lv in levels],
                "rss_mb": round(proc.rss_bytes() / 2**20, 1) if proc else None,
            }
    finally:
        for s in servers:
            s.stop()
        if ceiling is not None:
            ceiling.close()
    print_report(report, console)
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(report, indent=2))
    return report


def _paired(cfg: BenchConfig, ceiling: Any, targets: list[tuple[str, str, str]],
            count: Callable[[str], int]) -> dict[str, Any]:
    """Each round: the ceiling, then one request to each system; ratios taken pair by pair, so a
    machine whose speed drifts (shared, thermally limited) does not bias them."""
    ratios: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    rates: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    ceilings: list[float] = []
    for i in range(cfg.pairs):
        order = targets if i % 2 == 0 else list(reversed(targets))
        for name, url, model in order:
            c = ceiling.measure(128)
            tps = asyncio.run(single_stream_tps(url, model, max_tokens=128, count_tokens=count,
                                                api_key=cfg.api_key, api=cfg.api))
            ceilings.append(c)
            if c > 0 and tps > 0:
                ratios[name].append(tps / c)
                rates[name].append(tps)
    return {
        name: {
            "median_ratio": round(statistics.median(r), 3) if r else None,
            "min_ratio": round(min(r), 3) if r else None,
            "max_ratio": round(max(r), 3) if r else None,
            "median_tps": round(statistics.median(rates[name]), 1) if rates[name] else None,
        }
        for name, r in ratios.items()
    } | {"median_ceiling_tps": round(statistics.median(ceilings), 1)}


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def print_report(report: dict[str, Any], console: Console) -> None:
    console.print(f"\n[bold]{report['model']}[/] ({report['gguf']}), {report['requests_per_level']} "
                  f"requests/level{' (unique prompts)' if report.get('unique_prompts') else ''}, "
                  f"max_tokens {report['max_tokens']}, temperature 0, stream; "
                  f"{report['machine']}; {report['date']}")
    ceiling = report.get("ceiling_decode_tps")
    if ceiling:
        console.print(f"in-process llama.cpp decode ceiling: {ceiling} tok/s")
    paired = report.get("single_stream_vs_ceiling")
    if paired:
        for name, v in paired.items():
            if isinstance(v, dict):
                console.print(f"{name} single stream (128 tokens) / ceiling, paired: median "
                              f"{v['median_ratio']}x (min {v['min_ratio']}, max {v['max_ratio']}), "
                              f"{v['median_tps']} tok/s")
    systems = report["systems"]
    names = list(systems)
    table = Table(show_lines=False)
    table.add_column("concurrency", justify="right")
    for name in names:
        table.add_column(f"{name}\nagg tok/s", justify="right")
        table.add_column(f"{name}\nper-stream", justify="right")
        table.add_column(f"{name}\nTTFT p50/p95 ms", justify="right")
        table.add_column(f"{name}\nerrors", justify="right")
    # Ratios of each system against the last one (the peer, when there is one).
    versus = names[:-1] if len(names) >= 2 else []
    for name in versus:
        table.add_column(f"{name}/{names[-1]}\nagg ratio", justify="right")
        table.add_column(f"{name}/{names[-1]}\nTTFT p50 ratio", justify="right")
    n_levels = len(systems[names[0]]["levels"]) if names else 0
    for i in range(n_levels):
        row = [str(systems[names[0]]["levels"][i]["concurrency"])]
        for name in names:
            lv = systems[name]["levels"][i]
            row += [f"{lv['aggregate_tps']}", f"{lv['per_stream_tps']}",
                    f"{lv['ttft_p50_ms']} / {lv['ttft_p95_ms']}",
                    f"{lv['errors']}"
                    + (f" ({lv['empty_responses']} empty)" if lv["empty_responses"] else "")]
        last = systems[names[-1]]["levels"][i]
        for name in versus:
            a = systems[name]["levels"][i]
            row += [_ratio(a["aggregate_tps"], last["aggregate_tps"]),
                    _ratio(a["ttft_p50_ms"], last["ttft_p50_ms"])]
        table.add_row(*row)
    console.print(table)
    for name in names:
        if systems[name].get("rss_mb"):
            console.print(f"{name} RSS after the run: {systems[name]['rss_mb']} MiB")
