"""An in-process app on FAKE engines: create_app(settings, engine_loader=Loader()) with a small
catalog of local fake GGUF files (fake-chat: a chat model, fake-base: a base model)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from foundry_local_py.config import Settings
from foundry_local_py.engines.backends import EngineOptions
from tests.support.fake_engine import FakeEngine, Script


class Loader:
    """engine_loader for create_app: hands out FakeEngines sharing one script."""

    def __init__(self) -> None:
        self.script = Script()
        self.engines: list[FakeEngine] = []
        self.gate: threading.Event | None = None

    def __call__(self, fmt: str, path: Path, options: EngineOptions) -> FakeEngine:
        if self.gate is not None:
            assert self.gate.wait(30)
        engine = FakeEngine(self.script, max_batch=options.max_batch, chat="base" not in path.name)
        self.engines.append(engine)
        return engine


def fake_catalog(root: Path) -> Path:
    models = []
    for alias, task in (("fake-chat", "chat-completion"), ("fake-base", "text-completion")):
        f = root / f"{alias}.gguf"
        f.write_bytes(b"GGUF" + bytes(28))  # the store checks the magic of local GGUF files
        models.append(
            {
                "alias": alias,
                "display_name": alias,
                "publisher": "test",
                "license": "none",
                "task": task,
                "context_length": 256,
                "variants": [
                    {
                        "name": f"{alias}-cpu",
                        "format": "gguf",
                        "precision": "q4",
                        "source": {"kind": "local", "path": str(f)},
                    }
                ],
            }
        )
    path = root / "catalog.json"
    path.write_text(json.dumps({"schema_version": 1, "models": models}))
    return path


def fake_settings(tmp_path: Path, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "cache_dir": tmp_path / "cache",
        "catalog_path": fake_catalog(tmp_path),
        "default_model": "fake-chat",
        "n_threads": 1,
        "parallel": 2,
        "allowed_hosts": ["testserver", "127.0.0.1", "localhost"],
    }
    base.update(kw)
    return Settings(**base)


def wait_health(c: TestClient) -> int:
    deadline = time.monotonic() + 20
    while True:
        r = c.get("/health")
        if r.status_code == 200 or time.monotonic() > deadline:
            return r.status_code
        time.sleep(0.01)
