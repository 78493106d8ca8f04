"""Kill -9 chaos (issue 13): SIGKILL the real server in the middle of a download and of a model
load, restart it, and check the cache shows no half model (``cache list``), ``cache verify`` is
clean, and the job restarts or resumes. (A SIGKILLed conversion and two processes converting the
same variant: tests/integration/test_convert.py; a SIGKILLed ``model download`` CLI:
tests/reliability/test_download.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.fake_hub import FakeHub
from tests.support.hub_catalog import SMOL_FILE, SMOL_REPO, SMOL_SHA256, smol_gguf_path, write_user_catalog
from tests.support.serving import REPO_ROOT, SMOLLM, ServerProcess, chat_body

pytestmark = pytest.mark.slow


def _cli(cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    return subprocess.run(
        [sys.executable, "-m", "foundry_local_py.cli.main", *args],
        env={**base, "FOUNDRY_LOCAL_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200",
             **(env or {})},
        capture_output=True, text=True, timeout=120, check=False,
    )


def _kill_tree(proc: ServerProcess) -> None:
    """SIGKILL the server and then any child it had started (a model probe), by PID."""
    assert proc.proc is not None
    children = psutil.Process(proc.proc.pid).children(recursive=True)
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait(10)
    for child in children:
        try:
            child.kill()
            child.wait(10)
        except psutil.NoSuchProcess:
            pass


def _assert_cache_clean(cache: Path, absent: str) -> None:
    listing = _cli(cache, "cache", "list")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert absent not in listing.stdout, listing.stdout
    verify = _cli(cache, "cache", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "corrupt" not in verify.stdout.lower() and "missing" not in verify.stdout.lower(), verify.stdout


def _staged(cache: Path) -> list[Path]:
    staging = cache / ".staging"
    return [p for p in staging.rglob("*.incomplete")] if staging.exists() else []


@pytest.fixture
def hub():  # type: ignore[no-untyped-def]
    with FakeHub() as server:
        hosted = server.add_file(SMOL_REPO, SMOL_FILE, smol_gguf_path())
        assert hosted.sha256 == SMOL_SHA256
        yield server


def test_server_killed_during_a_download_restarts_and_resumes(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    write_user_catalog(cache)
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    hub.faults.rate_bytes_per_s = 15e6  # ~6.5 s for the 98 MB file: time to kill it mid-way

    def server() -> ServerProcess:
        return ServerProcess(cache_dir=cache, log_path=tmp_path / "server.log", env=env,
                             extra_args=["--n-threads", "1", "--no-preload"]).start()

    proc = server()
    progress: list[str] = []

    def download() -> None:
        try:
            with httpx.stream("POST", proc.url("/openai/download"), json={"model": {"Name": "smol-hub"}},
                              timeout=120) as r:
                for line in r.iter_lines():
                    progress.append(line)
        except httpx.HTTPError:
            progress.append("<connection lost>")

    t = threading.Thread(target=download)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = _staged(cache)
        if partial and partial[0].stat().st_size >= 20_000_000:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"the download never got going: {progress[-3:]}")
    _kill_tree(proc)
    t.join(30)
    assert progress and progress[-1] == "<connection lost>", progress[-3:]
    kept = _staged(cache)[0].stat().st_size
    assert 20_000_000 <= kept < 98_000_000

    _assert_cache_clean(cache, "smol-hub")

    hub.reset()
    proc = server()
    try:
        with httpx.stream("POST", proc.url("/openai/download"), json={"model": {"Name": "smol-hub"}},
                          timeout=120) as r:
            lines = [ln for ln in r.iter_lines() if ln]
        assert json.loads(lines[-1]) == {"Success": True, "ErrorMessage": None}, lines[-3:]
        (resumed,) = hub.gets(SMOL_FILE)
        assert resumed.range is not None and resumed.start is not None and resumed.start >= 20_000_000
        assert resumed.sent == 98362432 - resumed.start  # nothing fetched twice
        r = httpx.post(proc.url("/v1/chat/completions"), json=chat_body(model="smol-hub", max_tokens=3),
                       timeout=120)
        assert r.status_code == 200, r.text
    finally:
        assert proc.stop() == 0
    assert _staged(cache) == []
    listing = _cli(cache, "cache", "list")
    assert "smol-hub" in listing.stdout
    verify = _cli(cache, "cache", "verify")
    assert verify.returncode == 0 and "corrupt" not in verify.stdout.lower(), verify.stdout


def test_server_killed_during_a_model_load_restarts_cleanly(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    verdicts = tmp_path / "verdicts.json"
    env = {"FOUNDRY_LOCAL_PROBE_VERDICTS": str(verdicts)}

    def server() -> ServerProcess:
        return ServerProcess(cache_dir=cache, log_path=tmp_path / "server.log", env=env,
                             extra_args=["--n-threads", "1", "--no-preload"]).start()

    proc = server()
    assert proc.proc is not None
    result: list[int] = []

    def load() -> None:
        try:
            result.append(httpx.get(proc.url(f"/openai/load/{SMOLLM}"), timeout=120).status_code)
        except httpx.HTTPError:
            result.append(-1)

    t = threading.Thread(target=load)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(proc.url("/health"), timeout=5).json()
        if health["loading"]:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the load never started")
    time.sleep(0.3)  # into the probe child or the load itself
    _kill_tree(proc)
    t.join(30)
    assert result == [-1], result  # the load was cut off, not finished
    if verdicts.exists():  # written atomically: never half a file
        json.loads(verdicts.read_text())
    _assert_cache_clean(cache, "no-such-model")

    proc = server()
    try:
        r = httpx.get(proc.url(f"/openai/load/{SMOLLM}"), timeout=120)
        assert r.status_code == 200, r.text
        r = httpx.post(proc.url("/v1/chat/completions"), json=chat_body(max_tokens=3), timeout=120)
        assert r.status_code == 200, r.text
        assert json.loads(verdicts.read_text())  # the restarted load's probe left its verdict
    finally:
        assert proc.stop() == 0
