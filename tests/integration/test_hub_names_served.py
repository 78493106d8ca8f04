"""A Hugging Face GGUF by name, end to end: the CLI downloads hf.co/<owner>/<repo> from the fake
hub (the real SmolLM2 GGUF), a real server answers a chat whose ``model`` is that name, and
/openai/download takes the same name in a fresh cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerFactory
from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import SMOL_FILE, SMOL_REPO, smol_gguf_path

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = f"hf.co/{SMOL_REPO}"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_file(SMOL_REPO, SMOL_FILE, smol_gguf_path())
        yield server


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    full.update({"PYTHONPATH": str(REPO_ROOT), **env})
    return subprocess.run([sys.executable, "-m", "foundry_local_py", *args], env=full, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_download_then_a_request_by_name(hub: FakeHub, tmp_path: Path, server_factory: ServerFactory):
    cache = tmp_path / "cache"
    env = {"HF_ENDPOINT": hub.url, "FOUNDRY_LOCAL_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1"}
    done = _cli("model", "download", NAME, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    saved = json.loads((cache / "catalog.json").read_text())
    [entry] = saved["models"]
    assert entry["alias"] == NAME and entry["context_length"] == 8192  # read from the GGUF
    assert entry["variants"][0]["source"]["revision"] == hub.commit  # pinned

    server = server_factory("--no-preload", cache_dir=cache, env={"HF_ENDPOINT": hub.url})
    hub.clear_log()
    r = httpx.post(server.url("/v1/chat/completions"), timeout=120, json={
        "model": NAME.lower(), "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say hi"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    assert hub.log == []  # known from the user catalog: no hub request at all
    models = httpx.get(server.url("/v1/models"), timeout=30).json()
    assert NAME in {m["id"] for m in models["data"]}


def test_openai_download_takes_a_name(hub: FakeHub, server_factory: ServerFactory):
    server = server_factory("--no-preload", env={"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1"})
    with httpx.stream("POST", server.url("/openai/download"), timeout=120,
                      json={"model": {"Name": f"{NAME}:Q4_1"}}) as r:
        lines = [line for line in r.iter_lines() if line.strip()]
    assert r.status_code == 200
    assert json.loads(lines[-1])["Success"] is True, lines[-1]
    r = httpx.post(server.url("/v1/chat/completions"), timeout=120, json={
        "model": f"{NAME}:Q4_1", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    # a name the hub cannot satisfy is a clear client error, not a 500
    r = httpx.post(server.url("/openai/download"), timeout=60, json={"model": f"{NAME}:Q8_0"})
    assert r.status_code == 400 and "Q4_1" in r.json()["error"]["message"], r.text
    # a chat request never makes the server call the hub: an unknown name is a 404 that says
    # how to download it (a client cannot make it list repos or grow the user catalog)
    hub.clear_log()
    r = httpx.post(server.url("/v1/chat/completions"), timeout=60, json={
        "model": "hf.co/acme/never-downloaded", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 404 and "model download hf.co/acme/never-downloaded" in r.text, r.text
    assert hub.log == []


def test_model_run_by_name_downloads_and_answers(hub: FakeHub, tmp_path: Path):
    """`foundry-local model run hf.co/...` as Ollama users type it: the service starts, the
    model is downloaded through it, one answer is printed."""
    from tests.support.serving import free_port

    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "FOUNDRY_LOCAL_CACHE": str(tmp_path / "c"),
           "FOUNDRY_LOCAL_PORT": str(free_port()), "FOUNDRY_LOCAL_N_THREADS": "1",
           "FOUNDRY_LOCAL_PRELOAD": "false"}
    try:
        done = _cli("model", "run", f"{NAME}:q4_1", "Name three colors.", "--max-tokens", "16",
                    "--temperature", "0", env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Downloading" in done.stderr and done.stdout.strip()
    finally:
        _cli("service", "stop", env=env)
