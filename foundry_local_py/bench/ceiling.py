"""In-process llama.cpp decode speed: the ceiling for one stream on this machine."""

from __future__ import annotations

import time
from pathlib import Path


def llama_cpp_decode_tps(gguf: Path, *, n_threads: int, n_tokens: int = 128, repeats: int = 2) -> float:
    """Greedy decode tokens/s of ``llama_cpp.Llama`` (prompt time excluded), best of ``repeats``."""
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=2048, n_threads=n_threads, n_threads_batch=n_threads, verbose=False)
    messages = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]
    best = 0.0
    for _ in range(repeats):
        first = last = None
        count = 0
        for chunk in llm.create_chat_completion(
            messages=messages, max_tokens=n_tokens, temperature=0, stream=True  # type: ignore[arg-type]
        ):
            delta: dict[str, str] = chunk["choices"][0]["delta"]  # type: ignore[index,assignment]
            if delta.get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
                count += 1
        if first is not None and last is not None and last > first:
            best = max(best, (count - 1) / (last - first))
        llm.reset()
    llm.close()
    return best
