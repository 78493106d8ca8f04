"""``foundry-local bench``: load an OpenAI-compatible endpoint; ``--vs-peer`` adds llama_cpp.server,
``--vs llama-server`` llama.cpp's C++ server (same GGUF, same slots and KV pool)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import DEFAULT_MODEL, physical_cores


def bench(  # noqa: PLR0917 - one parameter per flag
    model: Annotated[str, typer.Option("--model", "-m")] = DEFAULT_MODEL,
    base_url: Annotated[str | None, typer.Option(help="Bench this endpoint instead of starting ours")] = None,
    requests: Annotated[int, typer.Option(help="Requests per concurrency level")] = 16,
    concurrency: Annotated[str, typer.Option(help="Comma-separated levels")] = "1,4,8",
    max_tokens: Annotated[int, typer.Option()] = 64,
    vs_peer: Annotated[bool, typer.Option("--vs-peer", help="Also run python -m llama_cpp.server")] = False,
    gguf: Annotated[Path | None, typer.Option(help="GGUF file for the peer and the ceiling")] = None,
    no_ceiling: Annotated[bool, typer.Option("--no-ceiling")] = False,
    n_threads: Annotated[int | None, typer.Option()] = None,
    api_key: Annotated[str | None, typer.Option()] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON")] = None,
    server_arg: Annotated[list[str] | None, typer.Option(help="Extra flag for our server")] = None,
    api: Annotated[str, typer.Option(help="chat, or completions for base models")] = "chat",
    pairs: Annotated[int, typer.Option(help="Single-stream vs ceiling rounds (alternating)")] = 6,
    unique_prompts: Annotated[bool, typer.Option(
        "--unique-prompts", help="Make every prompt new (no prompt-cache hits across requests)")] = False,
    baseline: Annotated[Path | None, typer.Option(
        help="Another checkout of this project to bench in the same run (before/after)")] = None,
    engines: Annotated[bool, typer.Option("--engines", help="Compare the model's local variants "
                                          "(llama.cpp vs ONNX) in-process instead")] = False,
    lora_mix: Annotated[bool, typer.Option("--lora-mix", help="Base only vs base + 2 LoRA adapters mixed, "
                                           "same concurrency (the highest level), one run")] = False,
    adapter: Annotated[list[Path] | None, typer.Option(
        help="GGUF LoRA for --lora-mix (twice; default: two random rank-8 adapters)")] = None,
    vs: Annotated[str | None, typer.Option(
        "--vs", help="Also run this peer on the same GGUF: llama-server (llama.cpp's C++ server, "
        "built by scripts/build_llama_server.sh) with our slots and KV pool size; or deterministic "
        "(our server in deterministic mode: what it costs)")] = None,
    llama_server: Annotated[Path | None, typer.Option(help="The llama-server binary")] = None,
    workloads: Annotated[str | None, typer.Option(
        help="Comma-separated: shared, unique, multi-turn, agent (default: shared; with --vs: all)")] = None,
    conversations: Annotated[int, typer.Option(help="Parallel conversations (multi-turn, agent)")] = 8,
    turns: Annotated[int, typer.Option(help="Turns per conversation (multi-turn, agent)")] = 6,
    rounds: Annotated[int, typer.Option(
        help="Rounds of each conversation workload; --lora-mix: base/mixed pairs (alternating)")] = 2,
) -> None:
    if engines:
        from ..bench.engines import compare

        compare(model, n_threads=n_threads or physical_cores())
        return
    if lora_mix:
        from ..bench.lora_mix import MixConfig, run_mix

        top = max(int(c) for c in concurrency.split(",") if c.strip())
        run_mix(MixConfig(
            model=model, requests=requests, concurrency=top,
            max_tokens=max_tokens, n_threads=n_threads or physical_cores(), adapters=adapter or [],
            server_args=server_arg or [], json_path=json_out, rounds=rounds,
        ))
        return
    from ..bench.run import BenchConfig, run

    run(BenchConfig(
        model=model, base_url=base_url, gguf=gguf, requests=requests,
        concurrency=[int(c) for c in concurrency.split(",") if c.strip()], max_tokens=max_tokens,
        vs_peer=vs_peer, ceiling=not no_ceiling, n_threads=n_threads or physical_cores(),
        api_key=api_key, json_path=json_out, server_args=server_arg or [], pairs=pairs,
        api=api, unique_prompts=unique_prompts, baseline=baseline, vs=vs, llama_server=llama_server,
        workloads=[w.strip() for w in (workloads or ("shared,unique,multi-turn,agent" if vs == "llama-server"
                                                     else "shared"))
                   .split(",") if w.strip()],
        conversations=conversations, turns=turns, rounds=rounds,
    ))
