"""Network-facing guards (checklist 2, 20): loopback bind, Host allowlist, API key on every route but
/health whatever the path spelling, body and header limits. Real server processes."""

from __future__ import annotations

import socket

import httpx
import openai
import psutil
import pytest

from tests.support.serving import SMOLLM, assert_openai_error, chat_body

pytestmark = pytest.mark.slow

KEY = "sk-test-0123456789abcdef"


def _raw(port: int, method: str, path: str, headers: list[str], body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte; returns (status, whole response)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close", *headers]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def _listening(pid: int) -> set[str]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN}


def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_binds_loopback_by_default(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--no-preload", host=None)
    assert proc.proc is not None
    assert _listening(proc.proc.pid) == {"127.0.0.1"}
    ip = _non_loopback_ip()
    if ip is not None:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{ip}:{proc.port}/health", timeout=5)


@pytest.mark.parametrize(
    "host", ["evil.example.com", "evil.example.com:80", "localhost.evil.com", "attacker.test:5273"]
)
def test_foreign_host_header_refused(http: httpx.Client, host: str) -> None:
    for path in ("/health", "/v1/models"):
        r = http.get(path, headers={"host": host})
        assert_openai_error(r, 403, code="invalid_host")
    r = http.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers={"host": host})
    assert_openai_error(r, 403, code="invalid_host")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]", "LOCALHOST:1234", "127.0.0.1:9"])
def test_local_host_headers_allowed(http: httpx.Client, host: str) -> None:
    assert http.get("/health", headers={"host": host}).status_code == 200


def test_body_over_the_limit_is_413(http: httpx.Client, server) -> None:  # type: ignore[no-untyped-def]
    big = b'{"model": "smollm2-135m", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")

    def chunks():  # no Content-Length: counted while reading
        for i in range(0, len(big), 1 << 20):
            yield big[i : i + (1 << 20)]

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")
    status, _ = _raw(server.port, "POST", "/v1/completions", ["Content-Length: banana"], b"{}")
    assert status == 400
    assert http.post("/v1/chat/completions", json=chat_body(max_tokens=2)).status_code == 200


def test_oversized_headers_refused_server_stays_up(http: httpx.Client, base_url: str) -> None:
    for headers in ({"x-big": "a" * 200_000}, {f"x-h{i}": "a" * 100 for i in range(2000)}):
        try:
            r = httpx.get(base_url + "/health", headers=headers, timeout=30)
            assert r.status_code == 431, r.text
            assert r.json()["error"]["code"] == "headers_too_large"
        except httpx.TransportError:
            pass  # the HTTP parser dropped the connection first: refused too
    assert http.get("/health").status_code == 200


# --- API key ------------------------------------------------------------------------------------

PROTECTED = [
    "/v1/models",
    f"/v1/models/{SMOLLM}",
    "/metrics",
    "/openai/status",
    "/openai/loadedmodels",
    "/foundry/list",
    "/docs",
    "/openapi.json",
    "//v1/models",
    "/v1//models",
    "/v1/models/",
    "/./v1/models",
    "/v1/../v1/models",
    "/V1/MODELS",
    "/HEALTH",
    "/health/",
    "//health",
    "/v1/%6Dodels",
    "/nonexistent",
]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.conftest import TEST_SERVER_ARGS
    from tests.support.serving import DRAINED_EXIT_CODES, ServerProcess

    root = tmp_path_factory.mktemp("keyed")
    proc = ServerProcess(
        cache_dir=root / "cache", log_path=root / "log", extra_args=[*TEST_SERVER_ARGS, "--api-key", KEY]
    ).start()
    yield proc
    rc = proc.stop()
    assert rc in DRAINED_EXIT_CODES, proc.log()[-2000:]


def _raw_get(port: int, path: str, auth: str | None = None) -> tuple[int, bytes]:
    """A GET with the path sent exactly as written (httpx would normalise '//' and '..')."""
    return _raw(port, "GET", path, [] if auth is None else [f"Authorization: {auth}"])


@pytest.mark.parametrize("path", PROTECTED)
def test_key_required_on_every_route_but_health(keyed, path: str) -> None:  # type: ignore[no-untyped-def]
    status, data = _raw_get(keyed.port, path)
    assert status == 401, (path, data[:300])
    assert b'"code": "invalid_api_key"' in data
    assert b"www-authenticate: bearer" in data.lower()
    status, _ = _raw_get(keyed.port, path, auth=f"Bearer {KEY}")
    assert status != 401, path


def test_health_is_open(keyed) -> None:  # type: ignore[no-untyped-def]
    status, data = _raw_get(keyed.port, "/health")
    assert status == 200, data
    assert httpx.get(keyed.url("/health?probe=1")).status_code == 200


# Spellings a path-prefix check could miss: percent-encoded slashes, dot segments, absolute-form
# targets, other methods. None may reach a route without the key.
SPELLINGS = [
    ("GET", "/v1%2Fmodels"),
    ("GET", "/%2Fv1/models"),
    ("GET", "/%2fv1%2fmodels"),
    ("GET", "/v1/models%2F"),
    ("GET", "/health%2F"),
    ("GET", "/health%2F..%2Fv1%2Fmodels"),
    ("GET", "/health/../v1/models"),
    ("GET", "/%2e/v1/models"),
    ("GET", "/health%00"),
    ("GET", "/health;/../v1/models"),
    ("GET", "http://127.0.0.1/v1/models"),
    ("GET", "http://127.0.0.1/health/../metrics"),
    ("POST", "//v1/chat/completions"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/V1/Chat/Completions"),
    ("POST", "/v1/chat%2Fcompletions"),
    ("POST", "/v1//completions"),
    ("HEAD", "/v1/models"),
    ("HEAD", "/metrics"),
    ("HEAD", "//v1/models"),
    ("OPTIONS", "/v1/models"),
    ("OPTIONS", "/v1/chat/completions"),
    ("OPTIONS", "*"),
    ("DELETE", "/v1/models"),
    ("PUT", "/openai/download"),
    ("PATCH", "/v1/chat/completions"),
]


@pytest.mark.parametrize(("method", "path"), SPELLINGS)
def test_key_required_whatever_the_spelling(keyed, method: str, path: str) -> None:  # type: ignore[no-untyped-def]
    body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
    extra = [f"Content-Length: {len(body)}", "Content-Type: application/json"] if body else []
    status, data = _raw(keyed.port, method, path, extra, body)
    assert status == 401, (method, path, data[:300])
    assert b"www-authenticate: bearer" in data.lower()
    if method != "HEAD":
        assert b'"code": "invalid_api_key"' in data
    status, data = _raw(keyed.port, method, path, [*extra, f"Authorization: Bearer {KEY}"], body)
    assert status != 401, (method, path, data[:300])


def test_health_spelled_otherwise_is_still_only_health(keyed) -> None:  # type: ignore[no-untyped-def]
    """'/%68ealth' decodes to '/health': open, and it is the health route, nothing else."""
    status, data = _raw_get(keyed.port, "/%68ealth")
    assert status == 200 and b'"status"' in data
    status, _ = _raw(keyed.port, "HEAD", "/health", [])
    assert status in (200, 405)


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "",
        "Bearer",
        f"Basic {KEY}",
        f"Bearer {KEY}x",
        f"Bearer {KEY[:-1]}",
        "Bearer wrong",
        f"{KEY}",
        f"Token {KEY}",
    ],
)
def test_wrong_credentials(keyed, auth: str | None) -> None:  # type: ignore[no-untyped-def]
    headers = {} if auth is None else {"authorization": auth}
    for method, path, body in (
        ("POST", "/v1/chat/completions", chat_body()),
        ("POST", "/v1/completions", {"model": SMOLLM, "prompt": "x"}),
        ("GET", "/v1/models", None),
    ):
        r = httpx.request(method, keyed.url(path), json=body, headers=headers, timeout=60)
        assert_openai_error(r, 401, code="invalid_api_key", type_="authentication_error")


def test_right_key_works(keyed) -> None:  # type: ignore[no-untyped-def]
    good = openai.OpenAI(base_url=keyed.url("/v1"), api_key=KEY, max_retries=0)
    r = good.chat.completions.create(model=SMOLLM, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert r.usage.completion_tokens >= 1
    assert [m.id for m in good.models.list().data]
    r2 = httpx.get(keyed.url("/metrics"), headers={"authorization": f"bearer {KEY}"})
    assert r2.status_code == 200  # the scheme is case-insensitive
    bad = openai.OpenAI(base_url=keyed.url("/v1"), api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_from_environment(server_factory) -> None:  # type: ignore[no-untyped-def]
    proc = server_factory("--no-preload", env={"FOUNDRY_LOCAL_API_KEY": KEY})
    assert httpx.get(proc.url("/v1/models")).status_code == 401
    assert httpx.get(proc.url("/v1/models"), headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(proc.url("/health")).status_code == 200
