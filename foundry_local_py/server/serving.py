"""The serving core: what every generating API shares, written once.

A route hands its request and its API's :class:`FrontEnd` class to :meth:`ServingCore.handle`,
which owns everything that is not the API's wire format:

- parsing the body into the API's wire type, counting the request in ``requests_total`` whatever
  happens (4xx, 5xx, 499 for a client that left, 500s from bugs included);
- the generation core (:mod:`..generation`): the front-end's asks are checked, the model resolved
  (loaded on demand), validated once against its capabilities and context, and queued;
- the first event awaited before a response starts (early failures become real HTTP errors), and
  a client that disconnects cancels its sequences (499);
- metrics per request (:class:`Recorder`: TTFT, inter-token latency, tokens, status);
- SSE framing and the non-streaming collection of the output.

A front-end turns its wire request into asks and events into wire bytes; nothing else. A new API
is a protocol module, a front-end module and a route (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.types import Message, Send

from ..config import Settings
from ..errors import FoundryError
from ..generation import Generation, GenerationAsk, Generator
from ..scheduler.output import LogprobEntry
from ..scheduler.scheduler import ErrorEvent, FinishEvent, StreamEvent, TextEvent
from .body import parse_body
from .errors import request_id
from .metrics import Metrics

DRAIN_GRACE_S = 30.0
T = TypeVar("T")
W = TypeVar("W", bound=BaseModel)


# --- what a front-end sees ----------------------------------------------------------------------


@dataclass
class ChoiceOutcome:
    """One choice's output so far: its text, logprobs and (once done) its finish event."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish: FinishEvent | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finish_reason(self) -> str | None:
        return self.finish.reason if self.finish and self.finish.reason != "cancelled" else None


@dataclass
class Outcome:
    choices: list[ChoiceOutcome]

    def usage(self) -> tuple[int, int, int]:
        """(prompt, completion, cached) tokens over every finished choice."""
        done = [c.finish for c in self.choices if c.finish]
        return (sum(f.prompt_tokens for f in done), sum(f.completion_tokens for f in done),
                sum(f.cached_tokens for f in done))


class FrontEnd(ABC, Generic[W]):
    """One API's wire format. Subclass per API; one instance per admitted request.

    Class side: the endpoint (metrics label), the wire request type, the id prefix and
    :meth:`asks`, which turns a wire request into generation asks (one per choice). Instance
    side: events -> stream bytes, or the finished outcome -> a JSON body.
    """

    endpoint: ClassVar[str]
    request_type: ClassVar[type[BaseModel]]
    id_prefix: ClassVar[str]

    def __init__(self, req: W, gen: Generation) -> None:
        self.req = req
        self.gen = gen
        self.created = int(time.time())

    @classmethod
    async def prepare(cls, req: Any) -> W:
        """Async work between parsing and :meth:`asks` (e.g. reading stored state the request
        refers to); returns what the front-end works on (by default the parsed request)."""
        return req

    @classmethod
    @abstractmethod
    def asks(cls, req: W, settings: Settings) -> list[GenerationAsk]:
        """The generation asks for ``req``; raise InvalidRequestError for what this API refuses."""

    @classmethod
    def streams(cls, req: W) -> bool:
        return bool(getattr(req, "stream", False))

    # --- streaming (every method returns framed bytes) --------------------------------------

    def stream_start(self) -> list[bytes]:
        return []

    @abstractmethod
    def stream_text(self, index: int, event: TextEvent) -> bytes | None:
        """The hot path: one event per generated token or few."""

    def stream_finish(self, index: int, event: FinishEvent, choice: ChoiceOutcome) -> list[bytes]:
        return []

    def stream_end(self, outcome: Outcome) -> list[bytes]:
        return []

    def stream_error(self, error: FoundryError, request_id: str) -> list[bytes]:
        """A failure after the stream started: the same body as an HTTP error would carry."""
        return [frame(error_json(error, request_id)), DONE]

    # --- non-streaming ----------------------------------------------------------------------

    @abstractmethod
    def body(self, outcome: Outcome) -> dict[str, Any]:
        """The JSON response for a finished request."""

    async def completed(self, outcome: Outcome) -> None:
        """Called once a request finished normally (stream or not), before it is counted."""


# --- metrics per request ----------------------------------------------------------------------


@dataclass
class Recorder:
    """Per-request metrics: TTFT, inter-token latency, tokens, status, duration.

    Created before the body is parsed, so every request is counted (model label '' until the
    model is known)."""

    metrics: Metrics
    endpoint: str
    request_id: str = "unknown"
    model: str = ""
    adapter: str = ""
    """The LoRA adapters the request used ('' for the base model): a label of its counts."""
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0
    """Set once the prompt is tokenized: counted even if the client leaves before the end."""
    tokens_seen: int = 0
    finished: bool = False
    done: bool = False

    def bind(self, model: str, adapter: str = "") -> None:
        self.model = model
        self.adapter = adapter
        # Bound once: labels() takes a lock and builds a key, too slow to do per token.
        self._itl = self.metrics.itl.labels(model)

    def on_text(self, event: TextEvent) -> None:
        if event.n_tokens <= 0:
            return
        self.tokens_seen += event.n_tokens
        if self.first_token_at is None:
            self.first_token_at = event.t
            self.metrics.ttft.labels(self.model).observe(max(0.0, event.t - self.started))
            extra = event.n_tokens - 1
            gap = 0.0
        else:
            extra = event.n_tokens
            gap = (event.t - (self.last_token_at or event.t)) / event.n_tokens
        for _ in range(extra):
            self._itl.observe(gap)
        self.last_token_at = event.t

    def on_finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.finished = True
        self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(self.model, self.adapter).inc(completion_tokens)

    def close(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        if not self.finished and (self.prompt_tokens or self.tokens_seen):
            # The client left (or the stream failed) mid-way: the work done still counts.
            self.metrics.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
            self.metrics.generation_tokens.labels(self.model, self.adapter).inc(self.tokens_seen)
        self.metrics.requests.labels(self.model, self.endpoint, status, self.adapter).inc()
        self.metrics.request_duration.labels(self.model, self.endpoint).observe(
            time.monotonic() - self.started
        )

    def close_for(self, exc: BaseException) -> None:
        """Count a request that ended with ``exc``: its status, or 500 for anything unexpected."""
        if isinstance(exc, FoundryError):
            self.close(str(exc.status))
        elif isinstance(exc, Exception):
            self.close("500")
        else:  # cancelled: the client went away
            self.close("499")


# --- the core ---------------------------------------------------------------------------------


class ServingCore:
    def __init__(self, settings: Settings, generator: Generator, metrics: Metrics) -> None:
        self.settings = settings
        self.generator = generator
        self.metrics = metrics

    def recorder(self, raw: Request, endpoint: str) -> Recorder:
        return Recorder(self.metrics, endpoint, request_id(raw))

    async def handle(self, raw: Request, api: type[FrontEnd[Any]]) -> Response:
        recorder = self.recorder(raw, api.endpoint)
        try:
            req = await api.prepare(await parse_body(raw, api.request_type, self.settings))
            asks = api.asks(req, self.settings)
            async with self.generator.resolved(asks) as model:
                recorder.bind(model.alias, model.adapter.name if model.adapter else "")
                gen = await self.generator.start(model, asks, api.id_prefix)
            recorder.prompt_tokens, recorder.adapter = gen.prompt_tokens, gen.adapter_label
            try:
                firsts = await unless_disconnected(gen.first_events(), raw)
                if firsts is None:
                    gen.cancel()
                    recorder.close("499")
                    return Response(status_code=499)
                for event in firsts:
                    if isinstance(event, ErrorEvent):
                        raise event.error
                fe = api(req, gen)
                if api.streams(req):
                    return sse(self.stream(fe, gen, firsts, recorder))
                outcome = await unless_disconnected(collect(gen, firsts, recorder), raw)
                if outcome is None:
                    gen.cancel()
                    recorder.close("499")
                    return Response(status_code=499)
                body = fe.body(outcome)
                await fe.completed(outcome)
            except BaseException:
                gen.cancel()
                raise
            recorder.close("200")
            return JSONResponse(body)
        except BaseException as exc:
            recorder.close_for(exc)
            raise

    async def stream(
        self, fe: FrontEnd[Any], gen: Generation, firsts: list[StreamEvent], recorder: Recorder
    ) -> AsyncIterator[bytes]:
        """A started generation as the front-end's stream bytes; counts the request when it ends
        (HTTP streams and the in-process SDK's streaming clients use it)."""
        status = "499"  # until the stream ends normally
        choices = [ChoiceOutcome() for _ in gen.handles]
        try:
            for chunk in fe.stream_start():
                yield chunk
            async for index, event in gen.events(firsts):
                choice = choices[index]
                if isinstance(event, TextEvent):
                    recorder.on_text(event)
                    choice.parts.append(event.text)
                    if event.logprobs:
                        choice.logprobs.extend(event.logprobs)
                    out = fe.stream_text(index, event)
                    if out:
                        yield out
                elif isinstance(event, FinishEvent):
                    if event.reason == "cancelled":
                        return
                    recorder.on_finish(event.prompt_tokens, event.completion_tokens)
                    choice.finish = event
                    for chunk in fe.stream_finish(index, event, choice):
                        yield chunk
                else:
                    status = str(event.error.status)
                    for chunk in fe.stream_error(event.error, recorder.request_id):
                        yield chunk
                    return
            outcome = Outcome(choices)
            tail = fe.stream_end(outcome)
            # Before the last event goes out: a client that reads it and at once refers to what
            # completed() stored (a stored response's id) must find it.
            await fe.completed(outcome)
            for chunk in tail:
                yield chunk
            status = "200"
        except Exception:
            status = "500"
            raise
        finally:
            gen.cancel()
            recorder.close(status)


async def collect(gen: Generation, firsts: list[StreamEvent], recorder: Recorder) -> Outcome:
    """A started generation's whole output (non-streaming requests); raises its error, if any."""
    choices = [ChoiceOutcome() for _ in gen.handles]
    async for index, event in gen.events(firsts):
        choice = choices[index]
        if isinstance(event, TextEvent):
            recorder.on_text(event)
            choice.parts.append(event.text)
            choice.logprobs.extend(event.logprobs)
        elif isinstance(event, FinishEvent):
            recorder.on_finish(event.prompt_tokens, event.completion_tokens)
            choice.finish = event
        else:
            raise event.error
    return Outcome(choices)


async def unless_disconnected(aw: Awaitable[T], request: Request) -> T | None:
    """Await ``aw`` unless the client disconnects first (then cancel it and return None).

    Starlette does not cancel a handler whose client went away; without this a non-streaming
    request would keep a decode slot busy for nobody.
    """
    task = asyncio.ensure_future(aw)
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# --- SSE framing --------------------------------------------------------------------------------


class _EventSource(EventSourceResponse):
    """sse-starlette's response, minus a cancel scope per event when no send timeout is set
    (one event per generated token: the scope was a measurable share of the per-token cost)."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)


def sse(stream: AsyncIterator[bytes]) -> EventSourceResponse:
    """SSE response over already framed events (:func:`frame`), a ping every 15 s."""
    return _EventSource(
        stream, sep="\n", ping=15, shutdown_grace_period=DRAIN_GRACE_S,
        headers={"Cache-Control": "no-cache"},
    )


def frame(data: str, event: str | None = None) -> bytes:
    """One SSE event: an optional ``event: <name>`` line, ``data: <json>`` and a blank line."""
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + data.encode() + b"\n\n"


DONE = frame("[DONE]")


class FastChunk:
    """The hot path of a stream: a chunk that carries only text, without building a model.

    ``event(text)`` equals ``frame(chunk_json(...))`` of the same chunk (a unit test holds them
    together); everything but the text is serialised once per stream.
    """

    def __init__(self, template: BaseModel, marker: str = "\x00TEXT\x00") -> None:
        before, _, after = chunk_json(template).partition(json.dumps(marker, ensure_ascii=False))
        self._framed_before, self._framed_after = b"data: " + before.encode(), after.encode() + b"\n\n"

    def event(self, text: str) -> bytes:
        return self._framed_before + json.dumps(text, ensure_ascii=False).encode() + self._framed_after


def chunk_json(model: BaseModel) -> str:
    """A stream chunk: unset optionals left out, but ``finish_reason`` always present."""
    data: dict[str, Any] = model.model_dump(mode="json", exclude_none=True)
    for choice in data.get("choices", []):
        choice.setdefault("finish_reason", None)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def error_json(error: FoundryError, request_id: str) -> str:
    """An error after the stream started: the same body as an HTTP error (5xx quote the request id)."""
    body = error.to_dict()
    if error.status >= 500:
        body["error"]["message"] = f"{error.message} (request id {request_id})"
    return json.dumps(body)
