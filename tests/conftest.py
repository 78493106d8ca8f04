"""Shared fixtures: real server processes (real SmolLM2 model), an OpenAI client, raw httpx."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

# One decode thread: on a shared 2-core machine llama.cpp's spinning worker threads slow down 5-20x
# whenever another process takes a core; with one thread the suite's runtime stays predictable.
TEST_SERVER_ARGS = ("--n-threads", "1")


def _shared_server(factory: pytest.TempPathFactory, name: str, *args: str) -> Iterator[ServerProcess]:
    """A session-wide real server on SmolLM2 with ``args``; it must exit cleanly at teardown."""
    root = factory.mktemp(name)
    proc = ServerProcess(
        cache_dir=root / "cache", log_path=root / "server.log", extra_args=[*TEST_SERVER_ARGS, *args]
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, f"server exited with {rc}:\n{proc.log()[-3000:]}"


def _openai(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0, timeout=180)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real server for most API tests: default settings, fresh cache, SmolLM2 preloaded."""
    yield from _shared_server(tmp_path_factory, "shared-server")


@pytest.fixture(scope="session")
def det_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A second shared server in deterministic mode, for tests that compare the tokens of two
    requests at temperature 0 (stream vs not, alone vs batched, computed vs restored from a
    cache). The default mode's shared KV pool does not promise that: a sequence's attention runs
    over whatever else the pool holds, and its last bits (so, on a near tie, a greedy token) vary
    with it, as in llama.cpp's own server with a unified KV cache."""
    yield from _shared_server(tmp_path_factory, "det-server", "--deterministic")


@pytest.fixture(scope="session")
def det_base_url(det_server: ServerProcess) -> str:
    return det_server.base_url


@pytest.fixture(scope="session")
def det_client(det_base_url: str) -> openai.OpenAI:
    return _openai(det_base_url)


@pytest.fixture(scope="session")
def base_url(server: ServerProcess) -> str:
    return server.base_url


@pytest.fixture(scope="session")
def client(base_url: str) -> openai.OpenAI:
    return _openai(base_url)


@pytest.fixture(scope="session")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=180) as c:
        yield c


@pytest.fixture(scope="session")
def gemma(http: httpx.Client) -> str:
    """Make sure gemma3-270m is loaded on the shared server; returns its alias."""
    r = http.get("/openai/load/gemma3-270m")
    assert r.status_code == 200, r.text
    return "gemma3-270m"


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with other settings: ``server_factory("--max-batch", "1", env={...})``.

    Each gets its own fresh cache unless ``cache_dir`` is given. All are SIGTERMed at teardown,
    and must exit cleanly.
    """
    started: list[ServerProcess] = []

    def make(
        *args: str,
        env: dict[str, str] | None = None,
        cache_dir: Path | None = None,
        wait: bool = True,
        host: str | None = "127.0.0.1",
    ) -> ServerProcess:
        n = len(started)
        extra = list(args) if "--n-threads" in args else [*TEST_SERVER_ARGS, *args]
        proc = ServerProcess(
            cache_dir=cache_dir or tmp_path / f"cache{n}",
            log_path=tmp_path / f"server{n}.log",
            extra_args=extra,
            env=env or {},
            host=host,
        )
        started.append(proc)
        return proc.start(wait=wait)

    yield make
    for proc in started:
        if proc.proc is None or proc.proc.poll() is not None:
            continue
        rc = proc.stop()
        assert rc in DRAINED_EXIT_CODES, f"server exited with {rc}:\n{proc.log()[-3000:]}"
