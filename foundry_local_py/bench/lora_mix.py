"""The LoRA adapter mix: what serving adapters per request costs in throughput.

One server, one run: the same number of requests at the same concurrency, first all on the base
model, then mixed evenly over the base and two adapters (``BASE:mix-a``, ``BASE:mix-b``). The
runner decodes one adapter set per ``llama_decode`` (groups take turns), so a mixed batch runs in
more, smaller decode calls; the report gives the mixed / base-only aggregate throughput ratio.

Without ``--adapter`` files, two rank-8 LoRAs with seeded random weights are written for the
base's ``attn_q`` / ``attn_v`` of six layers (their shapes read from the base GGUF), which is what
the serving cost depends on (rank, tensors), not what the weights learned.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from ..cache.adapters import AdapterStore
from ..cache.gguf_info import read_gguf_header
from .load import LevelResult, run_level, warm_up
from .run import machine, resolve_gguf, token_counter
from .servers import start_ours


@dataclass
class MixConfig:
    model: str = "smollm2-135m"
    requests: int = 24
    concurrency: int = 6
    max_tokens: int = 64
    n_threads: int = 2
    adapters: list[Path] = field(default_factory=list)
    server_args: list[str] = field(default_factory=list)
    log_dir: Path = Path(".bench-logs")
    json_path: Path | None = None
    rounds: int = 1
    """Base-only / mixed pairs, alternating which goes first."""


def write_random_lora(base_gguf: Path, out: Path, *, seed: int, rank: int = 8,
                      layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5), std: float = 0.05) -> Path:
    """A GGUF LoRA for ``base_gguf``'s attn_q / attn_v with seeded random A/B (llama.cpp's format)."""
    import gguf

    header = read_gguf_header(base_gguf)
    arch = str(header.values["general.architecture"])
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(2 * rank))
    for layer in layers:
        for target in ("attn_q", "attn_v"):
            name = f"blk.{layer}.{target}.weight"
            n_in, n_out = header.tensors[name][:2]
            writer.add_tensor(f"{name}.lora_a", rng.normal(0, std, (rank, n_in)).astype(np.float32))
            writer.add_tensor(f"{name}.lora_b", rng.normal(0, 4 * std, (n_out, rank)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def run_mix(cfg: MixConfig, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    gguf_path = resolve_gguf(cfg.model)
    count = token_counter(gguf_path)
    with tempfile.TemporaryDirectory(prefix="lora-mix-") as tmp:
        cache = Path(tmp) / "cache"
        files = cfg.adapters or [write_random_lora(gguf_path, Path(tmp) / f"mix-{c}.gguf", seed=i)
                                 for i, c in enumerate("ab")]
        store = AdapterStore(cache)
        names = []
        for i, f in enumerate(files[:2]):
            names.append(store.register(f, base=cfg.model, name=f"mix-{'ab'[i]}").model_name)
        mixed_models = [cfg.model, *names]
        console.print(f"starting foundry-local-py (adapters: {', '.join(names)}) ...")
        server = start_ours(cfg.model, n_threads=cfg.n_threads, log_dir=cfg.log_dir, cache_dir=cache,
                            extra=cfg.server_args)
        levels: dict[str, list[LevelResult]] = {"base": [], "mixed": []}
        try:
            for m in mixed_models:
                asyncio.run(warm_up(server.base_url, m))
            for r in range(cfg.rounds):
                order = ["base", "mixed"] if r % 2 == 0 else ["mixed", "base"]
                for kind in order:
                    console.print(f"  {kind}: concurrency {cfg.concurrency}, {cfg.requests} requests ...")
                    levels[kind].append(asyncio.run(run_level(
                        server.base_url, cfg.model, concurrency=cfg.concurrency, requests=cfg.requests,
                        max_tokens=cfg.max_tokens, count_tokens=count,
                        models=mixed_models if kind == "mixed" else ())))
        finally:
            server.stop()
    tps = {k: sum(lv.aggregate_tps for lv in v) / len(v) for k, v in levels.items()}
    errors = {k: sum(lv.errors for lv in v) for k, v in levels.items()}
    report = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
        "model": cfg.model, "concurrency": cfg.concurrency, "requests": cfg.requests,
        "max_tokens": cfg.max_tokens, "n_threads": cfg.n_threads, "rounds": cfg.rounds,
        "mix": mixed_models, "base_tps": round(tps["base"], 1), "mixed_tps": round(tps["mixed"], 1),
        "mixed_over_base": round(tps["mixed"] / tps["base"], 3) if tps["base"] else None,
        "errors": errors, "levels": {k: [lv.summary() for lv in v] for k, v in levels.items()},
    }
    console.print(f"base only: {report['base_tps']} tok/s; base + 2 adapters mixed: {report['mixed_tps']} "
                  f"tok/s; mixed / base = {report['mixed_over_base']} (errors {errors})")
    if cfg.json_path:
        cfg.json_path.write_text(json.dumps(report, indent=2))
    return report
