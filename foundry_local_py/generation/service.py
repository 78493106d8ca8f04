"""Running validated requests: admission to the model's scheduler and the events that come back.

:class:`Generator` is the HTTP-free entry point every front-end uses (the server's serving core
and the in-process SDK): ``resolved`` gives the model an ask names (loading it on demand) and
holds it loaded for the block, in which ``start`` queues the asks as one :class:`Generation`
(validated, queued; several asks = several choices decoded together); then read ``events()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

import anyio

from ..config import Settings
from ..scheduler.scheduler import ErrorEvent, FinishEvent, RequestHandle, StreamEvent
from .prompt import prompt_tokens, tool_plan
from .request import GenerationAsk, ServedModel
from .validate import ValidRequest, check_limits, validate


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class ModelSource(Protocol):
    def hold(self, name: str, *, ep: str | None = None,
             ttl: float | None = None) -> AbstractAsyncContextManager[ServedModel]:
        """The model ``name`` designates (loaded on demand), kept loaded until the block ends."""
        ...


@dataclass
class Generation:
    """Admitted requests (one per choice) and their event streams."""

    id: str
    model: ServedModel
    requests: list[ValidRequest]
    handles: list[RequestHandle]

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.requests)

    @property
    def adapter_label(self) -> str:
        return self.requests[0].adapter_label if self.requests else ""

    def cancel(self) -> None:
        for h in self.handles:
            if not h.done:
                h.cancel()

    async def first_events(self) -> list[StreamEvent]:
        """Each choice's first event (a failure before any token shows up here)."""
        firsts = [await h.queue.get() for h in self.handles]
        for h, ev in zip(self.handles, firsts, strict=True):
            if isinstance(ev, (FinishEvent, ErrorEvent)):
                h.done = True
        return firsts

    async def events(self, firsts: Sequence[StreamEvent] = ()) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Every choice's events in arrival order, tagged with the choice's index, starting with
        ``firsts`` when they were already taken. Ends when every choice finished or failed."""
        if len(self.handles) == 1:
            h = self.handles[0]
            if firsts:
                yield 0, firsts[0]
            if not h.done:
                async for event in h.events():
                    yield 0, event
            return
        queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

        async def pump(i: int, h: RequestHandle) -> None:
            if firsts:
                await queue.put((i, firsts[i]))
            if not h.done:
                async for event in h.events():
                    await queue.put((i, event))

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        remaining = len(self.handles)
        try:
            while remaining:
                index, event = await queue.get()
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    remaining -= 1
                yield index, event
        finally:
            for t in tasks:
                t.cancel()


class Generator:
    def __init__(self, models: ModelSource, settings: Settings) -> None:
        self.models = models
        self.settings = settings

    @contextlib.asynccontextmanager
    async def resolved(self, asks: Sequence[GenerationAsk]) -> AsyncIterator[ServedModel]:
        """Model-independent checks of every ask, then the (loaded) model they name, kept loaded
        until the block ends: :meth:`start` (or a token count) runs inside it."""
        for ask in asks:
            check_limits(ask, self.settings)
        first = asks[0]
        async with self.models.hold(first.model, ep=first.ep, ttl=first.ttl) as model:
            yield model

    async def count_prompt_tokens(self, ask: GenerationAsk) -> int:
        """The ask's prompt length in tokens, rendered as :meth:`start` renders it (the token
        counters of every API), with the model held while it tokenizes."""
        async with self.resolved([ask]) as model:
            return len(await anyio.to_thread.run_sync(prompt_tokens, ask, model, tool_plan(ask)))

    async def start(self, model: ServedModel, asks: Sequence[GenerationAsk], id_prefix: str) -> Generation:
        """Validate every ask against ``model``, then queue them all (429 when the queue is full)."""
        gid = new_id(id_prefix)
        ids = [gid] if len(asks) == 1 else [f"{gid}-{i}" for i in range(len(asks))]
        valid = [await validate(ask, model, rid) for ask, rid in zip(asks, ids, strict=True)]
        handles: list[RequestHandle] = []
        try:
            for v in valid:
                model.touch()
                handles.append(model.scheduler.submit(v.request))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return Generation(gid, model, valid, handles)
