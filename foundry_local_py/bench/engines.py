"""Engine comparison: the variants of one model (llama.cpp GGUF vs ONNX GenAI) side by side.

Each variant runs in its own process (so its memory is its own) through our engine protocol:
prompt processing tokens/s and time to first token on a fixed ~256-token prompt, greedy decode
tokens/s over 128 tokens, and the process's resident memory afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PROMPT = (
    "The history of lighthouses is a long one. Early lighthouses were simple fires lit on hilltops "
    "to guide ships at night. Later, towers were built so the light could be seen from farther "
    "away. The lighthouse of Alexandria, one of the wonders of the ancient world, stood for many "
    "centuries. In the modern era, lenses designed by Augustin Fresnel made lights far brighter, "
    "and keepers lived in the towers to tend the lamps, wind the clockwork and keep the glass "
    "clean. Storms, isolation and long nights were part of the job. Today most lighthouses are "
    "automated, but many are kept as museums, and some still guide ships along dangerous coasts. "
    "Write a short story about the last keeper of a lighthouse on a rocky island."
)


def _worker(fmt: str, path: str, n_threads: int, decode_tokens: int) -> dict[str, Any]:
    import psutil

    from ..engines.backends import EngineOptions, load_engine
    from ..engines.base import GenerationRequest, SamplingParams

    t0 = time.perf_counter()
    engine = load_engine(fmt, Path(path),
                         EngineOptions(n_threads=n_threads, max_batch=1, n_ctx=2048, kv_tokens=2048))
    load_s = time.perf_counter() - t0
    spec = engine.chat_template()

    def prompt_tokens(prompt: str) -> list[int]:
        if spec is None:
            return engine.tokenize(prompt)
        # Instruct models answer a raw prompt with end-of-turn at once: use their template.
        from ..engines.chat_template import ChatTemplate

        text = ChatTemplate(spec.source, bos_token=spec.bos_token, eos_token=spec.eos_token).render(
            [{"role": "user", "content": prompt}])
        return engine.tokenize(text, add_special=not (spec.bos_token and text.startswith(spec.bos_token)))

    runner = engine.create_runner()
    results = []
    # A warm-up round on another prompt (so no prompt cache is reused), then the measured one.
    for tokens in (prompt_tokens("Tell me a joke about the sea."), prompt_tokens(PROMPT)):
        runner.add(GenerationRequest("bench", tokens, decode_tokens, SamplingParams(temperature=0.0)))
        start = time.perf_counter()
        first = last = None
        n = 0
        done = False
        while not done and n < decode_tokens:
            outs = runner.step()
            now = time.perf_counter()
            for out in outs:
                if getattr(out, "end_of_generation", False) or not hasattr(out, "piece"):
                    done = True
                    break
                n += 1
                first = first or now
                last = now
        runner.remove("bench")
        if first is None or last is None:
            raise RuntimeError("the model produced no tokens")
        results.append({
            "ttft_ms": (first - start) * 1000,
            "prompt_tps": len(tokens) / (first - start),
            "decode_tps": (n - 1) / (last - first) if last > first else None,
            "decoded": n,
        })
    runner.close()
    rss = psutil.Process().memory_info().rss
    engine.close()
    return {**results[-1], "prompt_tokens": len(tokens), "load_s": load_s, "rss_mb": rss / 2**20,
            "engine": engine.info.engine}


def run_variant(fmt: str, path: Path, *, n_threads: int, decode_tokens: int = 128) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "foundry_local_py.bench.engines", fmt, str(path), str(n_threads),
           str(decode_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return dict(json.loads(lines[-1]))


def compare(model: str, *, n_threads: int, console: Console | None = None) -> list[dict[str, Any]]:
    """Every locally available variant of ``model``, measured one after another."""
    from ..cache.catalog import load_catalog
    from ..cache.store import ModelStore
    from ..config import Settings
    from ..errors import FoundryError

    console = console or Console()
    settings = Settings()
    catalog = load_catalog(settings.cache_dir, settings.catalog_path)
    store = ModelStore(settings.cache_dir)
    entry, _ = catalog.lookup(model)
    rows = []
    for variant in entry.variants:
        if variant.device != "cpu" or not store.is_available(entry, variant):
            continue
        console.print(f"  measuring {variant.id} ...")
        row: dict[str, Any] = {"variant": variant.id, "format": variant.format,
                               "precision": variant.precision}
        try:
            path = store.resolve(entry, variant)
        except FoundryError as exc:
            rows.append({**row, "error": exc.message[:200]})
            continue
        rows.append({**row, **run_variant(variant.format, path, n_threads=n_threads)})
    table = Table(title=f"{model}: engines on this machine ({n_threads} threads)")
    for col in ("variant", "engine", "prompt tok/s", "TTFT ms", "decode tok/s", "decode vs first", "RSS MiB"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    base = next((r.get("decode_tps") for r in rows if r.get("decode_tps")), None)
    for r in rows:
        if "error" in r:
            table.add_row(r["variant"], "-", "-", "-", "-", "-", r["error"])
            continue
        ratio = f"{r['decode_tps'] / base:.2f}x" if base and r.get("decode_tps") else "-"
        table.add_row(r["variant"], r["engine"], f"{r['prompt_tps']:.0f}", f"{r['ttft_ms']:.0f}",
                      f"{r['decode_tps']:.1f}", ratio, f"{r['rss_mb']:.0f}")
    console.print(table)
    return rows


if __name__ == "__main__":
    fmt_arg, path_arg, threads_arg, decode_arg = sys.argv[1:5]
    print(json.dumps(_worker(fmt_arg, path_arg, int(threads_arg), int(decode_arg))))
