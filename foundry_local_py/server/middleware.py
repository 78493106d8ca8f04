"""Request guards, as one pure ASGI middleware in front of everything.

- a request id on every request (``X-Request-Id``; quoted in 5xx bodies);
- Host header allowlist (DNS-rebinding guard; IP literals always pass);
- optional API key on every route except exactly ``GET /health``, whatever the path spelling
  (``//v1/...`` is not ``/health`` and so needs the key), compared in constant time;
- a request-body limit: 413 before parsing, from Content-Length or while reading;
- a deadline on reading the body (a client that never finishes it gets 408 and is disconnected;
  the headers' deadline is the HTTP protocol's, server/transport.py);
- a header limit (total bytes and count): 431, whatever the HTTP parser itself allows;
- while draining for shutdown: 503 to every new request but ``/health``; requests in flight are
  counted so the server knows when the drain is over.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..config import Settings
from .transport import Drain

PUBLIC_PATHS = frozenset({"/health"})


def _error(status: int, message: str, type_: str, code: str, extra_headers: list[tuple[bytes, bytes]]
           ) -> tuple[dict[str, object], bytes]:
    body = json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()
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
        rid_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        raw_headers = scope.get("headers", [])
        if len(raw_headers) > self.max_header_count or sum(
            len(k) + len(v) for k, v in raw_headers
        ) > self.max_header_bytes:
            await self._reject(send_with_id, 431, "Request header fields too large.",
                               "invalid_request_error", "headers_too_large")
            return
        headers = {k.lower(): v for k, v in raw_headers}
        host = headers.get(b"host", b"").decode("latin-1")
        if host and not _host_allowed(host, self.allowed_hosts):
            # 403 as Ollama answers a foreign Host: the request is understood and refused.
            await self._reject(send_with_id, 403, "Invalid Host header.", "invalid_request_error",
                               "invalid_host")
            return
        public = scope["path"] in PUBLIC_PATHS
        if (self.api_key is not None and not public and not self._authorized(headers)
                and not self._cors_preflight(scope, headers)):
            await self._reject(send_with_id, 401, "Incorrect or missing API key. Send 'Authorization: "
                               "Bearer <key>'.", "authentication_error", "invalid_api_key",
                               extra=[(b"www-authenticate", b"Bearer")])
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await self._reject(send_with_id, 400, "Invalid Content-Length.", "invalid_request_error",
                                   "invalid_request")
                return
            if too_big:
                await self._reject_too_large(send_with_id)
                return
        if self.drain.draining and not public:
            await self._reject(send_with_id, 503, "The server is shutting down; retry on another "
                               f"instance or after it restarts (request id {request_id}).",
                               "server_error", "shutting_down",
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
                    await self._reject(send_with_id, 408, f"The request body was not received within "
                                       f"{self.body_timeout_s:g} s.", "invalid_request_error",
                                       "request_timeout", extra=[(b"connection", b"close")])
                    return
                if more:
                    await self._reject_too_large(send_with_id)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_id)
        finally:
            self.drain.active -= 1

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        auth = headers.get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(token.strip(), self.api_key)

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

    async def _reject_too_large(self, send: Send) -> None:
        await self._reject(send, 413, f"Request body too large (limit {self.max_body} bytes).",
                           "invalid_request_error", "request_too_large")

    @staticmethod
    async def _reject(send: Send, status: int, message: str, type_: str, code: str, *,
                      extra: list[tuple[bytes, bytes]] | None = None) -> None:
        start, body = _error(status, message, type_, code, extra or [])
        await send(start)
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
