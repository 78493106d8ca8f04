#!/usr/bin/env python3
"""Benchmark-only: Foundry Local's own runtime, in-process, as a peer for ``scripts/bench.py --foundry-peer``.

Runs in the virtual environment made by ``scripts/foundry_peer_venv.sh`` (``foundry-local-sdk``
from PyPI, with its native Foundry Local Core); it never imports our package. It registers one
local ONNX GenAI folder in Foundry Local's *local* catalog (bring-your-own-model), loads it and
serves JSON commands, one per line on stdin, answering one JSON line on stdout:

- ``{"op": "run", "prompts": [...], "concurrency": C, "max_tokens": M}``: every prompt as a
  greedy streamed chat completion, C at a time (threads; the native calls release the GIL), with
  perf_counter timestamps of the start, first and last content chunk and the text of each;
- ``{"op": "rss"}``: this process's resident memory; ``{"op": "quit"}``.

Foundry Local's built-in web service does not list or serve models of the local catalog (2.2.1:
``Model not found``), so the peer is driven in-process, as an application embedding it would be.

Usage: foundry_peer_worker.py MODEL_DIR WORK_DIR
"""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from foundry_local_sdk import Configuration, FoundryLocalManager
from foundry_local_sdk.catalog import CatalogType
from foundry_local_sdk.model_info import ModelInfoBuilder
from foundry_local_sdk.openai.chat_client import ChatClientSettings


def one(model: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    client = model.get_chat_client()
    client.settings = ChatClientSettings(max_tokens=max_tokens, temperature=0.0)
    out: dict[str, Any] = {"ok": False, "start": time.perf_counter(), "first": None, "last": None,
                           "text": "", "error": None}
    parts: list[str] = []
    try:
        for chunk in client.complete_streaming_chat([{"role": "user", "content": prompt}]):
            for choice in chunk.choices:
                content = choice.delta.content if choice.delta else None
                if content:
                    now = time.perf_counter()
                    out["first"] = out["first"] or now
                    out["last"] = now
                    parts.append(content)
        out["ok"] = True
    except Exception as exc:  # reported, not raised: the bench counts errors
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    out["text"] = "".join(parts)
    return out


def main() -> None:
    model_dir, work = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    FoundryLocalManager.initialize(Configuration(
        app_name="foundry_peer_bench", app_data_dir=str(work / "app"),
        model_cache_dir=str(work / "cache"), logs_dir=str(work / "logs"),
        disable_nonessential_telemetry=True,
    ))
    manager = FoundryLocalManager.instance
    assert manager is not None
    catalog = manager.get_catalog(CatalogType.LOCAL)
    model_id = "bench-peer:1"
    if any(m.id == model_id for m in catalog.list_models()):
        catalog.unregister_model(model_id)
    info = ModelInfoBuilder().set_string_property("task", "chat-completion")
    model = catalog.register_model(model_dir, model_id, info)
    model.load()
    lock = threading.Lock()
    print(json.dumps({"ready": True, "model": model.id}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        if cmd["op"] == "rss":
            reply: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss}
        else:
            prompts, c, m = cmd["prompts"], int(cmd["concurrency"]), int(cmd["max_tokens"])
            t0 = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                results = list(pool.map(one, [model] * len(prompts), prompts, [m] * len(prompts)))
            reply = {"wall_s": time.perf_counter() - t0, "results": results}
        with lock:
            print(json.dumps(reply), flush=True)
    model.unload()
    manager.close()


if __name__ == "__main__":
    main()
