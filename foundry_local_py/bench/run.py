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

from ..engines.backends import kv_types
from .load import run_level, single_stream_tps, warm_up
from .servers import (
    ServerProcess,
    llama_server_binary,
    start_llama_cpp_server,
    start_llama_server,
    start_ours,
)
from .workloads import run_conversations


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
    vs: str | None = None
    """'llama-server': also run llama.cpp's C++ server on the same GGUF with our slots and pool;
    'deterministic': also run our server in deterministic mode (per-slot KV streams): its cost."""
    llama_server: Path | None = None
    """The llama-server binary (default: where scripts/build_llama_server.sh puts it)."""
    workloads: list[str] = field(default_factory=lambda: ["shared"])
    """Any of 'shared' (the 16 prompts, repeated), 'unique' (every prompt new), 'multi-turn' and
    'agent' (bench/workloads.py)."""
    conversations: int = 8
    turns: int = 6
    conversation_max_tokens: int = 48
    rounds: int = 2
    """Rounds of each conversation workload (alternating which system goes first)."""


WORKLOADS = ("shared", "unique", "multi-turn", "agent")


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


def _check(cfg: BenchConfig) -> Path | None:
    """Refuse unknown workloads / peers; the llama-server binary when ``--vs llama-server``."""
    unknown = set(cfg.workloads) - set(WORKLOADS)
    if unknown:
        raise SystemExit(f"unknown workload(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(WORKLOADS)}")
    if cfg.vs not in (None, "llama-server", "deterministic"):
        raise SystemExit(f"--vs {cfg.vs}: llama-server or deterministic")
    return llama_server_binary(cfg.llama_server) if cfg.vs == "llama-server" else None


def run(cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    peer_bin = _check(cfg)
    gguf = cfg.gguf or (resolve_gguf(cfg.model) if (cfg.vs_peer or cfg.vs or cfg.ceiling or not cfg.base_url)
                        else None)
    count = token_counter(gguf) if gguf else (lambda text: len(text.split()))
    report: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "model": cfg.model, "api": cfg.api, "gguf": gguf.name if gguf else None,
        "requests_per_level": cfg.requests, "unique_prompts": cfg.unique_prompts,
        "max_tokens": cfg.max_tokens, "n_threads": cfg.n_threads, "systems": {},
        "workloads": {}, "conversations": {},
    }
    ceiling = None
    if cfg.ceiling and gguf:
        from .ceiling import DecodeCeiling

        ceiling = DecodeCeiling(gguf, n_threads=cfg.n_threads)
        report["ceiling_decode_tps"] = round(max(ceiling.measure() for _ in range(3)), 1)

    servers: list[ServerProcess] = []
    targets: list[tuple[str, str, str]] = []  # (name, base_url, model name to send)
    try:
        _start(cfg, gguf, peer_bin, report=report, console=console, servers=servers, targets=targets)
        for _, url, model in targets:
            asyncio.run(warm_up(url, model, cfg.api_key, cfg.api))
        if ceiling is not None and cfg.pairs > 0:
            console.print(f"single stream vs the in-process ceiling, {cfg.pairs} alternating pairs ...")
            report["single_stream_vs_ceiling"] = _paired(cfg, ceiling, targets, count)
        _levels(cfg, report, console=console, servers=servers, targets=targets, count=count)
        _conversations(cfg, report, console=console, servers=servers, targets=targets, count=count)
    finally:
        for s in servers:
            s.stop()
        if ceiling is not None:
            ceiling.close()
    print_report(report, console)
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(report, indent=2))
    return report


def _start(cfg: BenchConfig, gguf: Path | None, peer_bin: Path | None, *, report: dict[str, Any],
           console: Console, servers: list[ServerProcess], targets: list[tuple[str, str, str]]) -> None:
    """Start the systems (appended to ``servers`` / ``targets`` as they come up)."""
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
    if cfg.vs == "deterministic":
        console.print("starting foundry-local-py --deterministic ...")
        det = start_ours(cfg.model, n_threads=cfg.n_threads, log_dir=cfg.log_dir,
                         extra=[*cfg.server_args, "--deterministic"], name="deterministic")
        servers.append(det)
        targets.append(("deterministic", det.base_url, cfg.model))
    if peer_bin is not None:
        assert gguf is not None
        parallel, kv_tokens, cache_type = _our_pool(targets[0][1], cfg.model, cfg.api_key)
        type_k, type_v = kv_types(cache_type, gpu=False)  # /v1/slots reports them resolved
        report["pool"] = {"parallel": parallel, "kv_tokens": kv_tokens, "cache_type_k": type_k,
                          "cache_type_v": type_v}
        console.print(f"starting llama-server (the peer): --parallel {parallel} -c {kv_tokens} "
                      f"--kv-unified -ctk {type_k} -ctv {type_v} ...")
        peer = start_llama_server(peer_bin, gguf, n_threads=cfg.n_threads, parallel=parallel,
                                  kv_tokens=kv_tokens, cache_types=(type_k, type_v), log_dir=cfg.log_dir)
        servers.append(peer)
        targets.append(("llama-server", peer.base_url, "peer"))


def _rss(servers: list[ServerProcess], name: str) -> float | None:
    proc = next((s for s in servers if s.name == name), None)
    return round(proc.rss_bytes() / 2**20, 1) if proc else None


def _levels(cfg: BenchConfig, report: dict[str, Any], *, console: Console, servers: list[ServerProcess],
            targets: list[tuple[str, str, str]], count: Callable[[str], int]) -> None:
    """The concurrency levels, per prompt workload ('shared', 'unique'); RSS after each level."""
    for w in [w for w in cfg.workloads if w in ("shared", "unique")]:
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for i, c in enumerate(cfg.concurrency):
            # Alternate who goes first at each level so drift does not favour one system.
            order = targets if i % 2 == 0 else list(reversed(targets))
            for name, url, model in order:
                console.print(f"  {name}: {w} prompts, concurrency {c}, {cfg.requests} requests ...")
                level = asyncio.run(run_level(url, model, concurrency=c, requests=cfg.requests,
                                              max_tokens=cfg.max_tokens, count_tokens=count,
                                              api_key=cfg.api_key, api=cfg.api,
                                              unique_prompts=cfg.unique_prompts or w == "unique"))
                results[name].append(level.summary() | {"rss_mb": _rss(servers, name)})
        report["workloads"][w] = {name: {"levels": levels, "rss_mb": _rss(servers, name)}
                                  for name, levels in results.items()}
        if not report["systems"]:
            report["systems"] = report["workloads"][w]


def _conversations(cfg: BenchConfig, report: dict[str, Any], *, console: Console,
                   servers: list[ServerProcess], targets: list[tuple[str, str, str]],
                   count: Callable[[str], int]) -> None:
    """The conversation workloads ('multi-turn', 'agent'), ``rounds`` each, alternating order."""
    for kind in [w for w in cfg.workloads if w in ("multi-turn", "agent")]:
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
        for r in range(cfg.rounds):
            order = targets if r % 2 == 0 else list(reversed(targets))
            for name, url, model in order:
                console.print(f"  {name}: {kind}, {cfg.conversations} conversations x {cfg.turns} turns ...")
                res = asyncio.run(run_conversations(
                    url, model, kind=kind, conversations=cfg.conversations, turns=cfg.turns,
                    max_tokens=cfg.conversation_max_tokens, count_tokens=count, api_key=cfg.api_key))
                rounds[name].append(res.summary() | {"rss_mb": _rss(servers, name)})
        report["conversations"][kind] = rounds


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


def _our_pool(base_url: str, model: str, api_key: str | None) -> tuple[int, int, str]:
    """(slots, KV pool tokens, K/V cache types) of our loaded ``model``, from /v1/slots: the peer
    gets the same."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    data = httpx.get(base_url.rstrip("/") + "/slots", headers=headers, timeout=30).json()["data"]
    entry = next((m for m in data if model in (m["model"], m["id"])), data[0])
    kv = entry.get("kv_cache") or {}
    return int(entry["parallel"]), int(kv.get("capacity_tokens") or 8192), str(kv.get("cache_type") or "f16")


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def print_report(report: dict[str, Any], console: Console) -> None:
    workloads = report.get("workloads") or {}
    if len(workloads) <= 1 and not report.get("conversations"):
        _print_levels(report, report["systems"], console)
        return
    for w, systems in workloads.items():
        _print_levels(report | {"unique_prompts": w == "unique"}, systems, console, title=f"{w} prompts")
    for kind, per_system in (report.get("conversations") or {}).items():
        _print_conversations(kind, per_system, console)
    if report.get("pool"):
        pool = report["pool"]
        console.print(f"pool: {pool['parallel']} slots, {pool['kv_tokens']} KV tokens (both servers)")


def _print_conversations(kind: str, per_system: dict[str, list[dict[str, Any]]], console: Console) -> None:
    first = next(iter(per_system.values()))[0]
    table = Table(title=f"{kind}: {first['conversations']} conversations x {first['turns']} turns, "
                        "rounds alternating")
    for col in ("system", "round", "agg tok/s", "TTFT p50/p95 ms", "turn p50/p95 ms", "errors", "RSS MiB"):
        table.add_column(col, justify="right")
    for name, rounds in per_system.items():
        for i, r in enumerate(rounds):
            table.add_row(name, str(i + 1), str(r["aggregate_tps"]),
                          f"{r['ttft_p50_ms']} / {r['ttft_p95_ms']}",
                          f"{r['turn_p50_ms']} / {r['turn_p95_ms']}", str(r["errors"]),
                          str(r.get("rss_mb")))
    console.print(table)
    names = list(per_system)
    for name in names[:-1]:
        a = [r["aggregate_tps"] for r in per_system[name]]
        b = [r["aggregate_tps"] for r in per_system[names[-1]]]
        console.print(f"{kind}: {name}/{names[-1]} aggregate, per round: "
                      + ", ".join(_ratio(x, y) for x, y in zip(a, b, strict=False)))
    for rounds in zip(*per_system.values(), strict=False):
        done = {name: r.get("turns_completed") for name, r in zip(names, rounds, strict=True)}
        if len(set(done.values())) > 1:
            errs = "; ".join(f"{n}: {r['first_error']}" for n, r in zip(names, rounds, strict=True)
                             if r.get("first_error"))
            planned = rounds[0].get("turns_planned")
            console.print(f"{kind}: not like for like: turns completed "
                          + ", ".join(f"{n} {d}/{planned}" for n, d in done.items())
                          + " (a failed turn ends its conversation, so the system with errors did "
                          f"less work). {errs}", style="yellow", markup=False)


def _print_levels(report: dict[str, Any], systems: dict[str, Any], console: Console, title: str = "") -> None:
    console.print(f"\n[bold]{report['model']}[/] ({report['gguf']}), {report['requests_per_level']} "
                  f"requests/level{' (unique prompts)' if report.get('unique_prompts') else ''}, "
                  f"max_tokens {report['max_tokens']}, temperature 0, stream; "
                  f"{report['machine']}; {report['date']}" + (f" [{title}]" if title else ""))
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
    names = list(systems)
    table = Table(show_lines=False)
    table.add_column("concurrency", justify="right")
    for name in names:
        table.add_column(f"{name}\nagg tok/s", justify="right")
        table.add_column(f"{name}\nper-stream", justify="right")
        table.add_column(f"{name}\nTTFT p50/p95 ms", justify="right")
        table.add_column(f"{name}\nerrors", justify="right")
        table.add_column(f"{name}\nRSS MiB", justify="right")
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
                    + (f" ({lv['empty_responses']} empty)" if lv["empty_responses"] else ""),
                    str(lv.get("rss_mb", "-"))]
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
