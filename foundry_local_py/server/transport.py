"""What sits between uvicorn and the application: bind policy, slow-client deadlines, draining.

- :func:`is_loopback`: whether an address to bind can only be reached from this machine;
- :func:`http_protocol`: uvicorn's HTTP protocol with a deadline on reading each request's
  headers. uvicorn has none (its keep-alive timer is cancelled by the first byte of a request), so
  a client trickling header bytes (slowloris) would hold its connection forever;
- :class:`Drain`: the shutdown state the middleware and ``/health`` read;
- :class:`DrainingServer`: a ``uvicorn.Server`` whose first SIGTERM/SIGINT starts a drain (new
  requests 503, ``/health`` says ``draining``, running requests finish or, past the drain timeout,
  end with ``finish_reason: "length"``) and whose second exits at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

FORCED_EXIT_CODE = 128 + signal.SIGTERM
"""Exit status after a second signal: the drain was cut short."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (``localhost``, 127.0.0.0/8, ``::1``)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def http_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with a deadline on each request's headers.

    The deadline starts when a connection opens or when the first byte of a next request arrives
    on a kept-alive connection; if the headers are not complete by then, the connection is closed.
    Bodies are bounded by the application (``GuardMiddleware``: 408 after ``body_timeout_s``).
    """
    try:
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - uvicorn without [standard]
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]

    class HeaderDeadlineProtocol(Base):
        _deadline: asyncio.TimerHandle | None = None
        _cycle_at_arm: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first bytes of a new request on a kept-alive connection
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._cycle_at_arm:
                self._disarm()  # the headers are complete: a new request/response cycle began

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._cycle_at_arm = self.cycle
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if self.cycle is not self._cycle_at_arm:
                return  # the headers came in time: a new request/response cycle began
            if not self.transport.is_closing():
                log.info("closing a connection that sent no complete request headers in %.0f s",
                         header_timeout_s)
                self.transport.close()

    return HeaderDeadlineProtocol


class Drain:
    """Shutdown state shared by the server, the middleware and ``/health``."""

    def __init__(self) -> None:
        self.draining = False
        self.since: float | None = None
        self.active = 0
        """Requests being served (``/health`` aside)."""

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self.since = time.monotonic()


class DrainingServer(uvicorn.Server):
    """First SIGTERM/SIGINT: drain, then shut down (exit 0). Second: exit at once."""

    def __init__(self, config: uvicorn.Config, drain: Drain, *, drain_timeout_s: float,
                 truncate: Callable[[], int]) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout_s = drain_timeout_s
        self.truncate = truncate
        """Make every running generation end at its next token; returns how many run."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self._loop is None:
            # second signal (or one before start-up finished): no more waiting
            log.warning("signal %s during shutdown: exiting now", sig)
            os._exit(FORCED_EXIT_CODE)
        self.drain.begin()
        log.info("signal %s: draining (new requests get 503; up to %.0f s for running ones)",
                 sig, self.drain_timeout_s)
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        deadline = time.monotonic() + self.drain_timeout_s
        while self.drain.active > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.05)
        if self.drain.active > 0:
            log.warning("drain timeout: ending %d running request(s) at their next token",
                        self.drain.active)
            cutoff = time.monotonic() + 15.0
            while self.drain.active > 0 and time.monotonic() < cutoff:
                self.truncate()
                await asyncio.sleep(0.05)
        self.should_exit = True
