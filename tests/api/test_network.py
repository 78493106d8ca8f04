"""Network exposure and slow clients (issue 13), with real server processes and raw sockets:

- a non-loopback bind without an API key refuses to start unless explicitly allowed;
- CORS is off by default and never answers ``*`` with credentials;
- slowloris: a client trickling headers, idling, or never finishing a body is disconnected after
  the header / body deadline, and many of them do not stop the server from serving others.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from foundry_local_py.server.transport import is_loopback
from tests.support.serving import REPO_ROOT, assert_openai_error, free_port

KEY = "sk-network-test-0123456789"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.6.7", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("example.com", False), ("", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def _serve(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int | None, str]:
    """Run ``foundry-local serve`` until it exits or ``timeout``; (exit status or None, output)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FOUNDRY_LOCAL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "foundry_local_py.cli.main", "serve", "--no-preload", *args],
        cwd=REPO_ROOT, env={**base, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out


@pytest.mark.slow
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "example.com"])
def test_non_loopback_bind_without_key_refuses_to_start(host: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    started = time.monotonic()
    rc, out = _serve("--host", host, "--port", str(port), "--cache-dir", str(tmp_path))
    assert rc not in (None, 0), out
    assert time.monotonic() - started < 30
    assert "refusing to listen" in out and "--allow-unauthenticated-remote" in out and "--api-key" in out
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


@contextlib.contextmanager
def _port_taken():  # type: ignore[no-untyped-def]
    """A port with a listener on 127.0.0.1: a server asked to bind 0.0.0.0 there fails to bind,
    which proves it got past the API-key check without ever serving on a public address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--allow-unauthenticated-remote"], {}),
        ([], {"FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE": "1"}),
        (["--api-key", KEY], {}),
        ([], {"FOUNDRY_LOCAL_API_KEY": KEY}),
    ],
)
def test_non_loopback_bind_allowed_with_key_or_flag(args: list[str], env: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    with _port_taken() as port:
        rc, out = _serve("--host", "0.0.0.0", "--port", str(port), "--cache-dir", str(tmp_path), *args,
                         env=env)
    assert "refusing to listen" not in out, out
    assert rc not in (None, 0), out  # it went on to bind, and the taken port stopped it there
    assert "address already in use" in out.lower() or "errno 98" in out.lower(), out[-2000:]
    if "--allow-unauthenticated-remote" in args or env.get("FOUNDRY_LOCAL_ALLOW_UNAUTHENTICATED_REMOTE"):
        assert "without an API key" in out


# --- CORS ----------------------------------------------------------------------------------------


def _preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url, headers={"origin": origin, "access-control-request-method": "POST",
                                       "access-control-request-headers": "authorization,content-type"})


@pytest.mark.slow
def test_cors_is_off_by_default(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--no-preload")
    r = httpx.get(proc.url("/v1/models"), headers={"origin": "http://evil.example"})
    assert r.status_code == 200
    assert "access-control-allow-origin" not in r.headers
    r = _preflight(proc.url("/v1/chat/completions"), "http://evil.example")
    assert "access-control-allow-origin" not in r.headers
    assert r.status_code in (400, 405)


@pytest.mark.slow
def test_cors_with_an_origin_and_a_key(server_factory) -> None:  # type: ignore[no-untyped-def]
    app = "http://app.example:3000"
    proc = server_factory("--no-preload", "--api-key", KEY, "--cors-origin", app)
    # a preflight carries no credentials: answered for the allowed origin, explicitly, never '*'
    r = _preflight(proc.url("/v1/chat/completions"), app)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == app
    assert r.headers.get("access-control-allow-credentials") == "true"
    # a foreign origin's preflight gets nothing (and, as any unauthenticated request, a 401)
    r = _preflight(proc.url("/v1/chat/completions"), "http://evil.example")
    assert "access-control-allow-origin" not in r.headers
    assert_openai_error(r, 401, code="invalid_api_key")
    # a plain OPTIONS (not a preflight) still needs the key
    assert httpx.options(proc.url("/v1/models")).status_code == 401
    # the actual request still needs the key
    assert httpx.get(proc.url("/v1/models"), headers={"origin": app}).status_code == 401
    r = httpx.get(proc.url("/v1/models"), headers={"origin": app, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app


@pytest.mark.slow
def test_cors_wildcard_never_allows_credentials(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--no-preload", "--cors-origin", "*")
    for r in (
        _preflight(proc.url("/v1/chat/completions"), "http://any.example"),
        httpx.get(proc.url("/v1/models"), headers={"origin": "http://any.example", "cookie": "a=b"}),
    ):
        assert "access-control-allow-origin" in r.headers, r.headers
        assert r.headers.get("access-control-allow-credentials") != "true", r.headers


# --- slow clients ----------------------------------------------------------------------------------

SLOW_ENV = {"FOUNDRY_LOCAL_HEADER_TIMEOUT_S": "1.5", "FOUNDRY_LOCAL_BODY_TIMEOUT_S": "1.5"}


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> tuple[bool, bytes, float]:
    """Keep trickling ``trickle`` (one byte at a time, every 0.2 s) until the server closes the
    connection; (closed, what it sent, seconds it took)."""
    sock.settimeout(0.2)
    started = time.monotonic()
    data = b""
    i = 0
    while time.monotonic() - started < seconds:
        if trickle:
            try:
                sock.sendall(trickle[i % len(trickle) : i % len(trickle) + 1])
            except OSError:
                return True, data, time.monotonic() - started
            i += 1
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, data, time.monotonic() - started
        if not chunk:
            return True, data, time.monotonic() - started
        data += chunk
    return False, data, time.monotonic() - started


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


@pytest.fixture
def slow_server(server_factory):  # type: ignore[no-untyped-def]
    return server_factory("--no-preload", env=SLOW_ENV)


@pytest.mark.slow
def test_trickled_headers_are_cut_off(slow_server) -> None:  # type: ignore[no-untyped-def]
    with _connect(slow_server.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed, data, took = _closed_within(s, 10, trickle=b"X-Slow: abcdefghijklmnopqrstuvwxyz\r\n")
    assert closed, "a client trickling headers kept its connection for 10 s"
    assert data == b""  # never answered: the request never existed
    print(f"\nSLOW trickled headers: closed after {took:.2f} s (deadline 1.5 s)")
    assert took < 1.5 + 2.0, took


@pytest.mark.slow
def test_silent_connection_is_closed(slow_server) -> None:  # type: ignore[no-untyped-def]
    with _connect(slow_server.port) as s:
        closed, _, took = _closed_within(s, 10)
    print(f"\nSLOW silent connection: closed after {took:.2f} s (deadline 1.5 s)")
    assert closed and took < 3.5, took


@pytest.mark.slow
def test_trickled_second_request_on_a_kept_alive_connection(slow_server) -> None:  # type: ignore[no-untyped-def]
    with _connect(slow_server.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        s.settimeout(5)
        first = b""
        while b"\r\n\r\n" not in first:
            first += s.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                          if ln.lower().startswith(b"content-length")))
        while len(body) < length:  # the whole first response, headers and body
            body += s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(0.5)  # within the keep-alive time: the connection is reused
        s.sendall(b"GET /health HTTP/1.1\r\n")
        closed, data, took = _closed_within(s, 10, trickle=b"X-Slow: 1\r\n")
    assert closed and data == b"" and took < 3.5, (closed, data, took)


@pytest.mark.slow
def test_unfinished_body_gets_408_and_is_disconnected(slow_server) -> None:  # type: ignore[no-untyped-def]
    with _connect(slow_server.port) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        closed, data, took = _closed_within(s, 10, trickle=b" ")
    assert closed, "a client trickling a body kept its connection for 10 s"
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b'"code": "request_timeout"' in data
    print(f"\nSLOW unfinished body: 408 and closed after {took:.2f} s (deadline 1.5 s)")
    assert took < 1.5 + 2.0, took


@pytest.mark.slow
def test_many_slow_clients_do_not_stop_the_server(slow_server) -> None:  # type: ignore[no-untyped-def]
    """60 connections: idle, trickling headers, or stuck in a body. Others are served meanwhile,
    and all 60 are gone after the deadline."""
    port = slow_server.port
    socks = [_connect(port) for _ in range(60)]
    try:
        for i, s in enumerate(socks):
            if i % 3 == 1:
                s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
            elif i % 3 == 2:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99\r\n\r\n{")
        started = time.monotonic()
        for _ in range(5):
            r = httpx.get(slow_server.url("/v1/models"), timeout=5)
            assert r.status_code == 200
        assert time.monotonic() - started < 2.0
        server = psutil.Process(slow_server.proc.pid)

        def held() -> int:
            return sum(1 for c in server.net_connections(kind="tcp")
                       if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)

        assert held() >= 50
        deadline = time.monotonic() + 8
        while held() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert held() == 0, f"{held()} slow connections still held"
        print(f"\nSLOW 60 slow clients: all closed {time.monotonic() - started:.2f} s after the first "
              "of them connected; 5 normal requests meanwhile served")
    finally:
        for s in socks:
            s.close()
    assert httpx.get(slow_server.url("/health"), timeout=5).status_code == 200
