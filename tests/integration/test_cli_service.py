"""The background service through real CLI processes, and the Python SDK that bootstraps it.

Every test runs ``python -m foundry_local_py.cli.main ...`` with its own ``FOUNDRY_LOCAL_CACHE``
(a temporary folder) and ``FOUNDRY_LOCAL_PORT`` (a free port), so nothing touches the user's home
or port 5273. The ``cli`` fixture always runs ``service stop`` at teardown and checks that the
service's process (the pid recorded in ``<cache>/.service/service.json``) is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from foundry_local_py.config import Settings
from foundry_local_py.sdk import FoundryLocalManager
from tests.support.serving import GEMMA, GEMMA_VARIANT, REPO_ROOT, SMOLLM, free_port

pytestmark = pytest.mark.slow

SMOL_ID = "smollm2-135m-instruct-q4_1-gguf-cpu:1"
GEMMA_ID = f"{GEMMA_VARIANT}:1"


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its parent to reap it counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _reap(pid: int) -> None:
    """Collect the exit status of a service this test process started itself (SDK), if any."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Cli:
    cache: Path
    port: int
    env: dict[str, str]
    pids: set[int] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(
        self, *args: str, stdin: str | None = None, timeout: float = 240
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "foundry_local_py.cli.main", *args], cwd=REPO_ROOT, env=self.env,
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False,
        )
        self.remember_pid()
        return result

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, f"{args}: rc {result.returncode}\n{result.stdout}\n{result.stderr}"
        return result.stdout

    def state(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.cache / ".service" / "service.json").read_text()))
        except FileNotFoundError:
            return None

    def remember_pid(self) -> int | None:
        state = self.state()
        if state is None:
            return None
        self.pids.add(int(state["pid"]))
        return int(state["pid"])

    def running_pid(self) -> int:
        pid = self.remember_pid()
        assert pid is not None, "no service.json"
        assert not _gone(pid), f"service pid {pid} is not running"
        return pid

    def loaded(self) -> dict[str, dict[str, Any]]:
        r = httpx.get(self.base_url + "/openai/loadedmodels", timeout=30)
        assert r.status_code == 200, r.text
        return {m["name"]: m for m in r.json()}


def _env(cache: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    env.update({
        "FOUNDRY_LOCAL_CACHE": str(cache),
        "FOUNDRY_LOCAL_PORT": str(port),
        "FOUNDRY_LOCAL_N_THREADS": "1",  # as the test servers run (see tests/conftest.py)
        "PYTHONPATH": str(REPO_ROOT),
        "COLUMNS": "200",  # rich tables without wrapping
        "NO_COLOR": "1",
    })
    return env


def _stop_and_check(cli: Cli) -> None:
    """``service stop``, then every service pid this test saw must be gone (killed if not, so a
    failing test leaves no process behind, and then reported)."""
    cli.remember_pid()
    result = cli.run("service", "stop")
    left = []
    for pid in cli.pids:
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not _gone(pid):
            left.append(pid)
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not left, f"service processes {left} were still running after 'service stop'"
    assert cli.state() is None


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    cache = tmp_path / "cache"
    port = free_port()
    c = Cli(cache, port, _env(cache, port))
    try:
        yield c
    finally:
        _stop_and_check(c)


def _table_rows(text: str) -> list[list[str]]:
    """Body rows of a rich table: cells of the lines drawn with '│'."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in text.splitlines() if line.lstrip().startswith("│")]


def _loaded_column(cli: Cli) -> dict[str, str]:
    """``model list``: variant id -> its Loaded cell."""
    rows = _table_rows(cli.ok("model", "list"))
    assert rows
    return {row[1]: row[-1] for row in rows}


def _chat_text(cli: Cli, content: str, max_tokens: int) -> str:
    r = httpx.post(cli.base_url + "/v1/chat/completions", timeout=120, json={
        "model": SMOLLM, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


# --- service verbs -----------------------------------------------------------------------------


def test_service_start_status_ps_logs_stop(cli: Cli) -> None:
    endpoint = f"{cli.base_url}/v1"
    not_running = cli.run("service", "status")
    assert not_running.returncode == 1 and "not running" in not_running.stdout

    started = cli.ok("service", "start")
    assert "started" in started and endpoint in started
    pid = cli.running_pid()
    assert f"pid {pid}" in started
    again = cli.ok("service", "start")  # a no-op while it runs
    assert "is running" in again and cli.running_pid() == pid

    status = cli.ok("service", "status")
    assert "running" in status and endpoint in status and SMOL_ID in status
    ps_rows = _table_rows(cli.ok("service", "ps"))
    assert [row[:2] for row in ps_rows] == [[SMOL_ID, SMOLLM]]
    logs = cli.ok("service", "logs", "-n", "20").splitlines()
    assert 0 < len(logs) <= 20 and any("loaded " + SMOL_ID in line for line in logs), logs

    stopped = cli.run("service", "stop")
    assert stopped.returncode == 0 and "Service stopped." in stopped.stdout
    assert _gone(pid) and cli.state() is None
    assert cli.run("service", "status").returncode == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(cli.base_url + "/health", timeout=5)
    assert "No background service" in cli.ok("service", "stop")


# --- model run ---------------------------------------------------------------------------------


def test_model_run_answers_one_prompt_starting_the_service(cli: Cli) -> None:
    assert cli.state() is None
    result = cli.run("model", "run", SMOLLM, "What is 2+2?", "--max-tokens", "20", "--temperature", "0")

    assert result.returncode == 0, result.stdout + result.stderr
    answer = result.stdout.strip()
    assert answer
    assert "Starting the service" in result.stderr
    cli.running_pid()
    assert "running" in cli.ok("service", "status")
    # what it printed is what the model answers (greedy: the same text over the API)
    assert answer == _chat_text(cli, "What is 2+2?", 20).strip()


def test_model_run_interactive(cli: Cli) -> None:
    cli.ok("service", "start")
    result = cli.run("model", "run", SMOLLM, "--max-tokens", "12", "--temperature", "0",
                     stdin="Hello\n/clear\nHello\n/exit\n")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Type /exit to quit" in result.stderr
    # a prompt before each of the four lines: answer, nothing (/clear), answer, nothing (/exit)
    turns = result.stdout.split(">>> ")
    assert len(turns) == 5 and turns[0] == turns[2] == turns[4] == "", turns
    first, second = turns[1].strip(), turns[3].strip()
    assert first and first == second  # /clear forgot the first exchange
    assert first == _chat_text(cli, "Hello", 12).strip()
    # end of input ends the chat as /exit does
    assert cli.run("model", "run", SMOLLM, "--max-tokens", "4", stdin="").returncode == 0


def test_model_run_completion_model(cli: Cli) -> None:
    cli.ok("service", "start")
    result = cli.run("model", "run", GEMMA, "Once upon a time", "--max-tokens", "12", "--temperature", "0")

    assert result.returncode == 0, result.stdout + result.stderr
    continuation = result.stdout.rstrip("\n")
    assert continuation.strip()
    r = httpx.post(cli.base_url + "/v1/completions", timeout=120, json={
        "model": GEMMA, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    assert continuation == r.json()["choices"][0]["text"]
    assert GEMMA_ID in cli.loaded()

    no_prompt = cli.run("model", "run", GEMMA)
    assert no_prompt.returncode != 0 and "completion model" in no_prompt.stderr + no_prompt.stdout


def test_model_load_unload_and_list(cli: Cli) -> None:
    without_service = _loaded_column(cli)
    assert without_service[SMOL_ID] == "" and without_service[GEMMA_ID] == ""
    assert cli.state() is None  # 'model list' does not start the service

    cli.ok("service", "start")
    listed = _loaded_column(cli)
    assert listed[SMOL_ID] == "yes" and listed[GEMMA_ID] == ""

    loaded = cli.ok("model", "load", GEMMA, "--ttl", "60")
    assert f"Loaded {GEMMA_ID}" in loaded
    assert cli.loaded()[GEMMA_ID]["ttl"] == 60
    assert [GEMMA_ID, GEMMA] in [row[:2] for row in _table_rows(cli.ok("service", "ps"))]
    listed = _loaded_column(cli)
    assert listed[SMOL_ID] == "yes" and listed[GEMMA_ID] == "yes"

    assert f"Unloaded {GEMMA_ID}" in cli.ok("model", "unload", GEMMA)
    assert GEMMA_ID not in cli.loaded()
    assert _loaded_column(cli)[GEMMA_ID] == ""
    again = cli.run("model", "unload", GEMMA)
    assert again.returncode == 1 and "not loaded" in again.stderr


# --- SDK ---------------------------------------------------------------------------------------


def test_sdk_bootstraps_the_service(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("FOUNDRY_LOCAL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FOUNDRY_LOCAL_N_THREADS", "1")  # the service it spawns inherits this
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    settings = Settings(cache_dir=cli.cache, port=cli.port)
    assert not FoundryLocalManager(bootstrap=False, settings=settings).is_service_running()

    manager = FoundryLocalManager(SMOLLM, settings=settings, timeout=120)
    cli.running_pid()

    assert manager.is_service_running()
    assert manager.endpoint == f"{cli.base_url}/v1"
    info = manager.get_model_info(SMOLLM)
    assert info is not None and info.id == SMOL_ID and info.alias == SMOLLM and info.runtime == "CPU"
    assert manager.get_model_info("no-such-model") is None
    assert [m.id for m in manager.list_loaded_models()] == [SMOL_ID]
    cached = {m.id for m in manager.list_cached_models()}
    assert {SMOL_ID, GEMMA_ID} <= cached
    assert manager.get_cache_location() == str(cli.cache)

    client = openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key, max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=info.id, messages=[{"role": "user", "content": "Say hi."}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8

    gemma = manager.load_model(GEMMA, ttl=120)
    assert gemma.id == GEMMA_ID
    assert {m.id for m in manager.list_loaded_models()} == {SMOL_ID, GEMMA_ID}
    manager.unload_model(GEMMA)
    manager.unload_model(SMOLLM)
    assert manager.list_loaded_models() == []
    assert manager.is_service_running()  # unloading leaves the service up; the fixture stops it


def test_sdk_passes_its_api_key_to_the_service_it_starts(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key given in code (not in the environment) must protect the service the SDK starts."""
    for key in [k for k in os.environ if k.startswith("FOUNDRY_LOCAL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("FOUNDRY_LOCAL_N_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    settings = Settings(cache_dir=cli.cache, port=cli.port, api_key="sdk-secret")

    manager = FoundryLocalManager(SMOLLM, settings=settings, timeout=120)
    cli.running_pid()

    assert manager.api_key == "sdk-secret"
    assert httpx.get(cli.base_url + "/openai/models", timeout=30).status_code == 401
    assert [m.id for m in manager.list_loaded_models()] == [SMOL_ID]  # the SDK's own calls carry it
    client = openai.OpenAI(base_url=manager.endpoint, api_key=manager.api_key, max_retries=0, timeout=120)
    assert client.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=manager.endpoint, api_key="wrong", max_retries=0).models.list()
    state = (cli.cache / ".service" / "service.json").read_text()
    assert "sdk-secret" not in state  # not written to disk
    assert all("sdk-secret" not in arg for arg in psutil.Process(cli.running_pid()).cmdline())
