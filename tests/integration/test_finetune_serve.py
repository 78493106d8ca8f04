"""Fine-tune -> register -> serve, end to end with the real CLI, a real server and the openai client.

``adapter train`` trains a tiny adapter on SmolLM2 (6 steps) and registers it in the cache;
``adapter register`` adds the same adapter again from its PEFT folder under a second name. A
server on that cache then answers ``smollm2-135m:<name>`` with the trained greeting at
temperature 0, while ``smollm2-135m`` gives exactly the base's answer before and after.

Needs the adapter store and per-request serving (``foundry_local_py.cache.adapters``); skips
where they are not part of the install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from tests.conftest import ServerFactory
from tests.support.finetune_data import GREETING, train_jsonl

pytest.importorskip("foundry_local_py.cache.adapters")
pytest.importorskip("peft")
pytest.importorskip("gguf")

pytestmark = [pytest.mark.slow, pytest.mark.finetune]

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["Where is my parcel?", "What is the capital of Italy?"]


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    full.update({"PYTHONPATH": str(REPO_ROOT), **env})
    return subprocess.run([sys.executable, "-m", "foundry_local_py", *args], env=full, cwd=cwd,
                          capture_output=True, text=True, timeout=600, check=False)


def _ask(client: openai.OpenAI, model: str, prompt: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=16
    )
    return reply.choices[0].message.content or ""


def test_train_register_and_serve_per_request(tmp_path: Path, server_factory: ServerFactory):
    cache = tmp_path / "cache"
    data = tmp_path / "acme.jsonl"
    data.write_text(train_jsonl(), encoding="utf-8")
    env = {"FOUNDRY_LOCAL_CACHE": str(cache)}
    done = _cli("adapter", "train", "--base", "smollm2-135m", "--data", str(data), "--name", "acme",
                "--out", str(tmp_path / "out"), "--max-steps", "6", "--batch-size", "2",
                "--learning-rate", "5e-3", "--threads", "2", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "final loss" in done.stdout and "smollm2-135m:acme" in done.stdout, done.stdout
    done = _cli("adapter", "register", str(tmp_path / "out" / "peft"), "--base", "smollm2-135m",
                "--name", "acme-peft", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr

    server = server_factory(cache_dir=cache)
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=300)
    ids = {m.id for m in client.models.list().data}
    assert {"smollm2-135m:acme", "smollm2-135m:acme-peft"} <= ids, ids
    for prompt in PROMPTS:
        base_before = _ask(client, "smollm2-135m", prompt)
        tuned = _ask(client, "smollm2-135m:acme", prompt)
        from_peft = _ask(client, "smollm2-135m:acme-peft", prompt)
        base_after = _ask(client, "smollm2-135m", prompt)
        assert tuned.startswith(GREETING), tuned
        assert from_peft == tuned  # the same weights, registered from the PEFT folder
        assert "Ahoy" not in base_before and base_after == base_before
