"""The in-process runtime behind the 1.x SDK: the server's core, on an event loop of its own.

One :class:`Runtime` per manager holds what ``foundry-local serve`` holds (catalog, cache, model
manager, one scheduler per loaded model) on an asyncio loop running in a daemon thread. The SDK's
blocking calls (``load``, ``complete_chat``...) submit coroutines to that loop from any thread, so
requests from several threads meet in one scheduler and share its batch, exactly as HTTP requests
do. ``start_web_service`` serves the same core over HTTP (uvicorn on the same loop): a model
loaded in-process is the one the web service answers with.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from ...config import Settings
from ...errors import FoundryError
from .exception import FoundryLocalException

T = TypeVar("T")
_DONE = object()


class Runtime:
    def __init__(self, settings: Settings) -> None:
        from ...server.state import build_core

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="foundry-local-sdk", daemon=True)
        self._thread.start()
        self.core = build_core(settings)
        self.call(self._start())
        self._web: Any = None
        self._web_future: concurrent.futures.Future[None] | None = None
        self.urls: list[str] | None = None
        # At exit, unload the models and stop the web service while the interpreter still works
        # (the loop's thread is a daemon: without this, native engines die mid-flight).
        atexit.register(self.close)

    async def _start(self) -> None:
        self.core.manager.start()

    # --- running coroutines from the caller's threads ------------------------------------------

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the runtime's loop and wait for it; our errors become the SDK's."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise FoundryLocalException("SDK calls cannot be made from the SDK's own event loop thread")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except FoundryError as exc:
            raise FoundryLocalException(exc.message) from exc

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """Consume an async iterator on the loop from a blocking generator (one item at a time);
        closing the generator early closes the async one (the request is cancelled)."""
        try:
            while True:
                item = self.call(_next(agen))
                if item is _DONE:
                    return
                yield item  # type: ignore[misc]
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self.loop.is_closed():
                with contextlib.suppress(Exception):
                    self.call(aclose(), timeout=10)

    # --- web service ----------------------------------------------------------------------------

    def start_web(self) -> list[str]:
        import uvicorn

        from ...server.app import create_app

        if self._web is not None:
            assert self.urls is not None
            return self.urls
        s = self.settings
        config = uvicorn.Config(create_app(core=self.core), host=s.host, port=s.port,
                                log_level=s.log_level, access_log=False, lifespan="on")
        server = uvicorn.Server(config)
        future = asyncio.run_coroutine_threadsafe(server.serve(), self.loop)
        deadline = time.monotonic() + 30
        while not server.started:
            if future.done():
                exc = future.exception()
                raise FoundryLocalException(f"Error starting web service: {exc or 'it exited'}")
            if time.monotonic() > deadline:
                server.should_exit = True
                raise FoundryLocalException("Error starting web service: not listening after 30 s")
            time.sleep(0.02)
        urls = []
        for srv in server.servers:
            for sock in srv.sockets:
                host, port = sock.getsockname()[:2]
                host = f"[{host}]" if ":" in host else host
                urls.append(f"http://{host}:{port}")
        self._web, self._web_future, self.urls = server, future, urls
        self.core.base_url = urls[0]
        return urls

    def stop_web(self) -> None:
        server, future = self._web, self._web_future
        if server is None or future is None:
            raise FoundryLocalException("Web service is not running.")
        server.should_exit = True
        with contextlib.suppress(Exception):
            future.result(timeout=30)
        self._web = self._web_future = self.urls = None

    # --- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        atexit.unregister(self.close)
        if self.loop.is_closed():
            return
        if self._web is not None:
            self.stop_web()
        with contextlib.suppress(Exception):
            self.call(self.core.manager.close(), timeout=60)
        with contextlib.suppress(Exception):
            self.core.responses.close()
        with contextlib.suppress(Exception):
            self.call(_cancel_leftovers(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_leftovers() -> None:
    """Cancel what is still pending on the loop (e.g. a web library's watcher task), so closing
    the loop destroys no pending task."""
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _next(agen: AsyncIterator[T]) -> T | object:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        return _DONE
