"""POST /v1/completions: raw prompts (a string, a list of strings, or token ids).

Several prompts become several sequences decoded together; their choices carry the prompt's
index. Streams interleave chunks of all choices, each tagged with its index, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engines.base import GenerationRequest
from ..errors import FoundryError, InvalidRequestError
from ..protocol.common import Usage
from ..protocol.completions import Completion, CompletionChoice, CompletionLogprobs, CompletionRequest
from ..scheduler.output import LogprobEntry
from ..scheduler.scheduler import ErrorEvent, FinishEvent, RequestHandle, StreamEvent, TextEvent
from .errors import request_id
from .model_manager import LoadedModel
from .serving import (
    DONE,
    FastChunk,
    Recorder,
    ServingContext,
    check_common,
    chunk_json,
    completion_budget,
    error_chunk,
    first_event,
    frame,
    new_id,
    raise_if_error,
    sampling_params,
    sse,
    submit,
    unless_disconnected,
)

ENDPOINT = "/v1/completions"
MAX_PROMPTS = 16


@dataclass
class _Choice:
    index: int
    handle: RequestHandle
    echo_text: str
    text: list[str] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish: FinishEvent | None = None


class CompletionServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        if req.suffix:
            raise InvalidRequestError("suffix (fill-in-the-middle) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != 1:
            raise InvalidRequestError("only best_of=1 is supported", param="best_of")
        prompts = req.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequestError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        check_common(req, self.ctx.settings, top_logprobs=req.logprobs)
        lm = await self.ctx.manager.get(req.model, ep=req.ep, ttl=req.ttl)
        recorder = Recorder(self.ctx.metrics, lm.alias, ENDPOINT, request_id(raw))
        try:
            return await self._run(req, raw, lm, prompts, recorder)
        except FoundryError as exc:
            recorder.close(str(exc.status))
            raise

    async def _run(
        self, req: CompletionRequest, raw: Request, lm: LoadedModel, prompts: list[str | list[int]],
        recorder: Recorder,
    ) -> Response:
        sampling = sampling_params(req, lm, top_logprobs=req.logprobs, constraint=None)
        n_vocab = lm.engine.info.n_vocab

        def tokenize_all() -> list[list[int]]:
            out = []
            for p in prompts:
                if isinstance(p, str):
                    out.append(lm.engine.tokenize(p, add_special=True))
                else:
                    if any(t >= n_vocab for t in p):
                        raise InvalidRequestError("prompt has token ids outside the vocabulary",
                                                  param="prompt")
                    out.append(list(p))
            return out

        token_lists = await anyio.to_thread.run_sync(tokenize_all)
        recorder.prompt_tokens = sum(len(t) for t in token_lists)
        cid = new_id("cmpl")
        gens = [
            GenerationRequest(f"{cid}-{i}", toks,
                              completion_budget(lm, len(toks), req.max_tokens, "prompt"),
                              sampling, req.stop_list())
            for i, toks in enumerate(token_lists)
        ]
        choices: list[_Choice] = []
        try:
            for i, gen in enumerate(gens):
                echo = ""
                if req.echo:
                    p = prompts[i]
                    echo = p if isinstance(p, str) else lm.engine.detokenize(p).decode(
                        "utf-8", errors="replace")
                choices.append(_Choice(i, submit(lm, gen), echo))
            firsts: list[StreamEvent] = []
            for c in choices:
                ev = await first_event(c.handle, raw)
                if ev is None:
                    recorder.close("499")
                    return Response(status_code=499)
                raise_if_error(ev)
                firsts.append(ev)
        except BaseException:
            for c in choices:
                c.handle.cancel()
            raise
        merged = _merge(choices, firsts)
        if req.stream:
            return sse(self._stream(req, cid, choices, merged, recorder))
        result = await unless_disconnected(self._collect(choices, merged, recorder), raw)
        if result is None:
            for c in choices:
                c.handle.cancel()
            recorder.close("499")
            return Response(status_code=499)
        body = Completion(
            id=cid, created=int(time.time()), model=req.model,
            choices=[
                CompletionChoice(
                    index=c.index,
                    text=c.echo_text + "".join(c.text),
                    finish_reason=c.finish.reason if c.finish and c.finish.reason != "cancelled" else None,
                    logprobs=_logprobs(c.logprobs, len(c.echo_text)) if req.logprobs is not None else None,
                )
                for c in choices
            ],
            usage=_usage(choices),
        )
        recorder.close("200")
        return JSONResponse(body.model_dump(mode="json"))

    @staticmethod
    async def _collect(
        choices: list[_Choice], merged: AsyncIterator[tuple[int, StreamEvent]], recorder: Recorder
    ) -> bool:
        async for index, event in merged:
            c = choices[index]
            if isinstance(event, TextEvent):
                recorder.on_text(event)
                c.text.append(event.text)
                c.logprobs.extend(event.logprobs)
            elif isinstance(event, FinishEvent):
                recorder.on_finish(event.prompt_tokens, event.completion_tokens)
                c.finish = event
            elif isinstance(event, ErrorEvent):
                raise event.error
        return True

    async def _stream(
        self, req: CompletionRequest, cid: str, choices: list[_Choice],
        merged: AsyncIterator[tuple[int, StreamEvent]], recorder: Recorder,
    ) -> AsyncIterator[bytes]:
        created = int(time.time())

        def chunk(index: int, text: str, finish: Any = None, logprobs: CompletionLogprobs | None = None,
                  ) -> bytes:
            return frame(chunk_json(Completion(
                id=cid, created=created, model=req.model,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)],
            )))

        fast = {c.index: FastChunk(Completion(
            id=cid, created=created, model=req.model,
            choices=[CompletionChoice(index=c.index, text="\x00TEXT\x00", finish_reason=None)],
        )) for c in choices}
        status = "499"
        offsets = {c.index: len(c.echo_text) for c in choices}
        try:
            for c in choices:
                if c.echo_text:
                    yield chunk(c.index, c.echo_text)
            async for index, event in merged:
                c = choices[index]
                if isinstance(event, TextEvent):
                    recorder.on_text(event)
                    lp = None
                    if req.logprobs is not None:
                        lp = _logprobs(event.logprobs, offsets[index])
                    offsets[index] += len(event.text)
                    if lp:
                        yield chunk(index, event.text, logprobs=lp)
                    elif event.text:
                        yield fast[index].event(event.text)
                elif isinstance(event, FinishEvent):
                    if event.reason == "cancelled":
                        return
                    recorder.on_finish(event.prompt_tokens, event.completion_tokens)
                    c.finish = event
                    yield chunk(index, "", finish=event.reason)
                elif isinstance(event, ErrorEvent):
                    status = str(event.error.status)
                    yield frame(error_chunk(event.error, recorder.request_id))
                    break
            else:
                if req.include_usage():
                    yield frame(chunk_json(Completion(id=cid, created=created, model=req.model, choices=[],
                                                      usage=_usage(choices))))
                status = "200"
            yield DONE
        finally:
            for c in choices:
                if not c.handle.done:
                    c.handle.cancel()
            recorder.close(status)


async def _merge(
    choices: list[_Choice], firsts: list[StreamEvent]
) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Events of all choices in arrival order, tagged with the choice index."""
    if len(choices) == 1:
        yield 0, firsts[0]
        if not isinstance(firsts[0], (FinishEvent, ErrorEvent)):
            async for event in choices[0].handle.events():
                yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent]] = asyncio.Queue()

    async def pump(c: _Choice, first: StreamEvent) -> None:
        await queue.put((c.index, first))
        if isinstance(first, (FinishEvent, ErrorEvent)):
            return
        async for event in c.handle.events():
            await queue.put((c.index, event))

    tasks = [asyncio.ensure_future(pump(c, f)) for c, f in zip(choices, firsts, strict=True)]
    remaining = len(choices)
    try:
        while remaining:
            index, event = await queue.get()
            if isinstance(event, (FinishEvent, ErrorEvent)):
                remaining -= 1
            yield index, event
    finally:
        for t in tasks:
            t.cancel()


def _logprobs(entries: list[LogprobEntry], offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for e in entries:
        out.tokens.append(e.token)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({t: lp for (t, _raw, lp) in e.top} if e.top else None)
        out.text_offset.append(offset)
        offset += len(e.token)
    return out


def _usage(choices: list[_Choice]) -> Usage:
    prompt = sum(c.finish.prompt_tokens for c in choices if c.finish)
    completion = sum(c.finish.completion_tokens for c in choices if c.finish)
    cached = sum(c.finish.cached_tokens for c in choices if c.finish)
    return Usage.of(prompt, completion, cached)
