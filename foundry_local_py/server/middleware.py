"""Request guards, as one pure ASGI middleware in front of everything.

- a request id on every request (``X-Request-Id``; quoted in 5xx bodies);
- Host header allowlist (DNS-rebinding guard; IP literals always pass);
- optional API key on every route except exactly ``GET /health``, whatever the path spelling
  (``//v1/...`` is not ``/health`` and so needs the key), compared in constant time; sent as
  ``Authorization: Bearer <key>`` (OpenAI's clients) or ``x-api-key: <key>`` (Anthropic's);
- a request-body limit: 413 before parsing, from Content-Length or while reading;
- a deadline on reading the body (a client that never finishes it gets 408 and is disconnected;
  the headers' deadline is the HTTP protocol's, server/transport.py);
- a header limit (total bytes and count): 431, whatever the HTTP parser itself allows;
- while draining for shutdown: 503 to every new request but ``/health``; requests in flight are
  counted so the server knows when the drain is over.

Refusals are rendered by server/errors.py in the route's error shape (Anthropic's on
``/v1/messages*``, where the request id also goes out as ``request-id``, the header Anthropic's
clients read).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .errors import ErrorStyle, error_body, error_style
from .transport import Drain

PUBLIC_PATHS = frozenset({"/health"})


def _error(status: int, message: str, type_: str, code: str, *, extra_headers: list[tuple[bytes, bytes]],
           style: ErrorStyle) -> tuple[dict[str, object], bytes]:
    status, payload = error_body(status, message, type_=type_, code=code, style=style)
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *extra_headers]
    return {"type": "http.response.start", "status": status, "headers": headers}, body


def _host_allowed(host_header: str, allowed: list[str]) -> bool:
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):
        name = host[: host.find("]") + 1] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name in allowed:
        return True
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True  # an IP literal cannot be rebound by DNS
    except ValueError:
        return False


class GuardMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings, drain: Drain | None = None) -> None:
        self.app = app
        self.drain = drain or Drain()
        self.body_timeout_s = settings.body_timeout_s
        self.cors_origins = {o.lower() for o in settings.cors_origins}
        self.max_body = settings.max_body_bytes
        self.max_header_bytes = settings.max_header_bytes
        self.max_header_count = settings.max_header_count
        self.allowed_hosts = [h.lower() for h in settings.allowed_hosts]
        key = settings.api_key_value()
        self.api_key = key.encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id
        style = error_style(scope["path"])
        rid_headers = [(b"x-request-id", request_id.encode())]
        if style == "anthropic":
            rid_headers.append((b"request-id", request_id.encode()))

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *rid_headers]}
            await send(message)

        async def reject(status: int, message: str, type_: str, code: str, *,
                         extra: list[tuple[bytes, bytes]] | None = None) -> None:
            start, body = _error(status, message, type_, code, extra_headers=extra or [], style=style)
            await send_with_id(start)
            await send_with_id({"type": "http.response.body", "body": body, "more_body": False})

        raw_headers = scope.get("headers", [])
        if len(raw_headers) > self.max_header_count or sum(
            len(k) + len(v) for k, v in raw_headers
        ) > self.max_header_bytes:
            await reject(431, "Request header fields too large.", "invalid_request_error",
                         "headers_too_large")
            return
        headers = {k.lower(): v for k, v in raw_headers}
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not _host_allowed(host, self.allowed_hosts):
            # 403 as Ollama answers a foreign Host: the request is understood and refused.
            await reject(403, "Invalid Host header.", "invalid_request_error", "invalid_host")
            return
        public = scope["path"] in PUBLIC_PATHS
        if (self.api_key is not None and not public and not self._authorized(headers)
                and not self._cors_preflight(scope, headers)):
            await reject(401, "Incorrect or missing API key. Send 'Authorization: Bearer <key>' "
                         "or 'x-api-key: <key>'.", "authentication_error", "invalid_api_key",
                         extra=[(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        too_large = f"Request body too large (limit {self.max_body} bytes)."
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await reject(400, "Invalid Content-Length.", "invalid_request_error", "invalid_request")
                return
            if too_big:
                await reject(413, too_large, "invalid_request_error", "request_too_large")
                return
        if self.drain.draining and not public:
            await reject(503, "The server is shutting down; retry on another instance or after it "
                         f"restarts (request id {request_id}).", "server_error", "shutting_down",
                         extra=[(b"retry-after", b"5"), (b"connection", b"close")])
            return
        if public:
            await self.app(scope, receive, send_with_id)
            return
        self.drain.active += 1
        try:
            if scope["method"] in ("POST", "PUT", "PATCH"):
                try:
                    body, more = await asyncio.wait_for(self._read_body(receive), self.body_timeout_s)
                except asyncio.TimeoutError:
                    await reject(408, f"The request body was not received within {self.body_timeout_s:g} s.",
                                 "invalid_request_error", "request_timeout",
                                 extra=[(b"connection", b"close")])
                    return
                if more:
                    await reject(413, too_large, "invalid_request_error", "request_too_large")
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self.drain.active -= 1

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        """``Authorization: Bearer <key>`` or ``x-api-key: <key>``; either, compared in constant time."""
        assert self.api_key is not None
        ok = False
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            ok = scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        x_key = headers.get(b"x-api-key")
        if x_key is not None:
            ok = hmac.compare_digest(x_key.strip(), self.api_key) or ok
        return ok

    def _cors_preflight(self, scope: Scope, headers: dict[bytes, bytes]) -> bool:
        """A CORS preflight from an allowed origin (browsers never send credentials with one):
        answered by the CORS middleware without reaching any route."""
        if scope["method"] != "OPTIONS" or not self.cors_origins:
            return False
        origin = headers.get(b"origin", b"").decode("latin-1").lower()
        return bool(origin) and b"access-control-request-method" in headers and (
            origin in self.cors_origins or "*" in self.cors_origins)

    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """Read the body up to the limit; ``more`` is True when it is larger."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"".join(chunks), False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
