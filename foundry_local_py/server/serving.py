"""What chat and text completions share: validation against the model, sampling, admission,
metrics recording, and the SSE framing rules.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel
from sse_starlette import EventSourceResponse
from starlette.types import Message, Send

from ..config import Settings
from ..engines.base import Constraint, GenerationRequest, SamplingParams
from ..errors import ContextLengthExceededError, FoundryError, InvalidRequestError
from ..protocol.common import SamplingFields
from ..scheduler.output import LogprobEntry
from ..scheduler.scheduler import ErrorEvent, FinishEvent, RequestHandle, StreamEvent, TextEvent
from .metrics import Metrics
from .model_manager import LoadedModel, ModelManager

DRAIN_GRACE_S = 30.0
T = TypeVar("T")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class ServingContext:
    settings: Settings
    manager: ModelManager
    metrics: Metrics


# --- validation ---------------------------------------------------------------------------------


def check_common(fields: SamplingFields, settings: Settings, *, top_logprobs: int | None) -> None:
    """Model-independent checks: cheap, before any model is touched."""
    if fields.n != 1:
        raise InvalidRequestError("only n=1 is supported", param="n")
    stops = fields.stop_list()
    if len(stops) > settings.max_stop_sequences:
        raise InvalidRequestError(
            f"at most {settings.max_stop_sequences} stop sequences are allowed", param="stop"
        )
    if any(len(s) > settings.max_stop_length for s in stops):
        raise InvalidRequestError(
            f"stop sequences must be at most {settings.max_stop_length} characters", param="stop"
        )
    if fields.logit_bias and len(fields.logit_bias) > settings.max_logit_bias:
        raise InvalidRequestError(
            f"logit_bias may have at most {settings.max_logit_bias} entries", param="logit_bias"
        )
    if top_logprobs is not None and top_logprobs > settings.max_top_logprobs:
        raise InvalidRequestError(
            f"top_logprobs must be at most {settings.max_top_logprobs}", param="top_logprobs"
        )


def sampling_params(
    fields: SamplingFields,
    lm: LoadedModel,
    *,
    top_logprobs: int | None,
    constraint: Constraint | None,
) -> SamplingParams:
    n_vocab = lm.engine.info.n_vocab
    bias: dict[int, float] = {}
    for key, value in (fields.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise InvalidRequestError(f"logit_bias key '{key[:32]}' is not a token id",
                                      param="logit_bias") from None
        if not 0 <= tok < n_vocab:
            raise InvalidRequestError(f"logit_bias token id {tok} is outside the vocabulary",
                                      param="logit_bias")
        bias[tok] = value
    defaults = SamplingParams()
    if constraint is not None and not lm.engine.info.supports_constraints:
        raise InvalidRequestError(
            f"model '{lm.alias}' ({lm.engine.info.engine}) does not support structured output",
            param="response_format",
        )
    if top_logprobs is not None and not lm.engine.info.supports_logprobs:
        raise InvalidRequestError(f"model '{lm.alias}' does not return logprobs", param="logprobs")
    return SamplingParams(
        temperature=defaults.temperature if fields.temperature is None else fields.temperature,
        top_p=defaults.top_p if fields.top_p is None else fields.top_p,
        top_k=defaults.top_k if fields.top_k is None else fields.top_k,
        min_p=defaults.min_p if fields.min_p is None else fields.min_p,
        seed=fields.effective_seed(),
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repeat_penalty=fields.repeat_penalty if fields.repeat_penalty is not None else 1.0,
        logit_bias=bias,
        top_logprobs=top_logprobs,
        constraint=constraint,
    )


def completion_budget(lm: LoadedModel, n_prompt: int, requested: int | None, param: str) -> int:
    """max_tokens for the engine; 400 ``context_length_exceeded`` quoting both counts."""
    n_ctx = lm.engine.info.n_ctx
    if n_prompt >= n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has "
            f"{n_prompt} tokens. Please reduce the length of the prompt.",
            param=param,
        )
    if requested is not None and n_prompt + requested > n_ctx:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{n_prompt + requested} tokens ({n_prompt} in the prompt, {requested} for the "
            f"completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested if requested is not None else n_ctx - n_prompt


async def validate_constraint(lm: LoadedModel, constraint: Constraint | None) -> None:
    if constraint is not None:
        await anyio.to_thread.run_sync(lm.engine.validate_constraint, constraint)


# --- running ------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """Per-request metrics: TTFT, inter-token latency, tokens, status, duration."""

    metrics: Metrics
    model: str
    endpoint: str
    request_id: str = "unknown"
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None
    prompt_tokens: int = 0
    """Set once the prompt is tokenized: counted even if the client leaves before the end."""
    tokens_seen: int = 0
    finished: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        # Bound once: labels() takes a lock and builds a key, too slow to do per token.
        self._itl = self.metrics.itl.labels(self.model)

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
        self.metrics.generation_tokens.labels(self.model).inc(completion_tokens)

    def close(self, status: str) -> None:
        if self.done:
            return
        self.done = True
        if not self.finished and (self.prompt_tokens or self.tokens_seen):
            # The client left (or the stream failed) mid-way: the work done still counts.
            self.metrics.prompt_tokens.labels(self.model).inc(self.prompt_tokens)
            self.metrics.generation_tokens.labels(self.model).inc(self.tokens_seen)
        self.metrics.requests.labels(self.model, self.endpoint, status).inc()
        self.metrics.request_duration.labels(self.model, self.endpoint).observe(
            time.monotonic() - self.started
        )


def submit(lm: LoadedModel, gen: GenerationRequest) -> RequestHandle:
    lm.touch()
    return lm.scheduler.submit(gen)


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


async def first_event(handle: RequestHandle, request: Request) -> StreamEvent | None:
    """Wait for the first event, or return None if the client went away meanwhile.

    Pulling the first event before the response starts turns early failures (queue timeout,
    engine errors) into real HTTP errors instead of broken streams.
    """
    event = await unless_disconnected(handle.queue.get(), request)
    if event is None:
        handle.cancel()
    elif isinstance(event, (FinishEvent, ErrorEvent)):
        handle.done = True
    return event


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def events_after(first: StreamEvent, handle: RequestHandle) -> AsyncIterator[StreamEvent]:
    yield first
    if isinstance(first, (FinishEvent, ErrorEvent)):
        return
    async for event in handle.events():
        yield event


def raise_if_error(event: StreamEvent | None) -> None:
    if isinstance(event, ErrorEvent):
        raise event.error


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


def frame(data: str) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    return b"data: " + data.encode() + b"\n\n"


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


def error_chunk(error: FoundryError, request_id: str) -> str:
    """An error after the stream started: the same body as an HTTP error (5xx quote the request id)."""
    body = error.to_dict()
    if error.status >= 500:
        body["error"]["message"] = f"{error.message} (request id {request_id})"
    return json.dumps(body)



def chat_logprobs(entries: list[LogprobEntry]) -> list[dict[str, object]]:
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.raw),
            "top_logprobs": [
                {"token": t, "logprob": lp, "bytes": list(raw)} for (t, raw, lp) in e.top
            ],
        }
        for e in entries
    ]

