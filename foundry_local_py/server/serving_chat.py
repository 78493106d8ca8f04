"""POST /v1/chat/completions: from an OpenAI chat request to a stream or a completion."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from ..engines.base import Constraint, GenerationRequest
from ..engines.chat_format import (
    ParsedToolCall,
    ToolSpec,
    could_become_tool_call,
    parse_tool_calls,
    tool_call_constraint,
)
from ..errors import FoundryError, InvalidRequestError
from ..protocol.chat import (
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChunkChoice,
    FunctionCall,
    NamedToolChoice,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
)
from ..protocol.common import ChoiceLogprobs, TokenLogprob, Usage
from ..scheduler.scheduler import ErrorEvent, FinishEvent, RequestHandle, StreamEvent, TextEvent
from .errors import request_id
from .model_manager import LoadedModel
from .serving import (
    DONE,
    FastChunk,
    Recorder,
    ServingContext,
    chat_logprobs,
    check_common,
    chunk_json,
    completion_budget,
    error_chunk,
    events_after,
    first_event,
    frame,
    new_id,
    raise_if_error,
    sampling_params,
    sse,
    submit,
    unless_disconnected,
    validate_constraint,
)

ENDPOINT = "/v1/chat/completions"


class _Plan:
    """What the request asks of tools and structured output."""

    def __init__(self, req: ChatCompletionRequest) -> None:
        tools = [
            ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
            for t in (req.tools or [])
        ]
        choice = req.tool_choice
        if choice is not None and not tools and choice != "none":
            raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
        if choice is None:
            choice = "auto" if tools else "none"
        self.tools: list[ToolSpec] = [] if choice == "none" else tools
        self.forced: list[ToolSpec] = []
        if isinstance(choice, NamedToolChoice):
            named = [t for t in tools if t.name == choice.function.name]
            if not named:
                raise InvalidRequestError(
                    f"tool_choice names '{choice.function.name}', which is not among the tools",
                    param="tool_choice",
                )
            self.forced = named
        elif choice == "required":
            self.forced = tools
        self.constraint: Constraint | None = None
        if self.forced:
            self.constraint = tool_call_constraint(self.forced)
        elif req.response_format is not None and req.response_format.type != "text":
            rf = req.response_format
            if rf.type == "json_object":
                self.constraint = Constraint(kind="json_object")
            else:
                assert rf.json_schema is not None
                self.constraint = Constraint(kind="json_schema", schema=rf.json_schema.schema_)

    @property
    def mode(self) -> str:
        if self.forced:
            return "forced"
        return "auto" if self.tools else "none"


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = []
    for m in req.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text() if m.content is not None else None}
        if m.name:
            d["name"] = m.name
        if m.tool_calls:
            d["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


@dataclass
class _Call:
    """One admitted request: what the response builders need."""

    req: ChatCompletionRequest
    cid: str
    first: StreamEvent
    handle: RequestHandle
    plan: _Plan
    recorder: Recorder


class ChatServing:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        settings = self.ctx.settings
        if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        top_lp = (req.top_logprobs or 0) if req.logprobs else None
        check_common(req, settings, top_logprobs=top_lp)
        plan = _Plan(req)
        lm = await self.ctx.manager.get(req.model, ep=req.ep, ttl=req.ttl)
        recorder = Recorder(self.ctx.metrics, lm.alias, ENDPOINT, request_id(raw))
        try:
            return await self._run(req, raw, lm, plan, top_lp, recorder)
        except FoundryError as exc:
            recorder.close(str(exc.status))
            raise

    async def _run(  # noqa: PLR0917
        self, req: ChatCompletionRequest, raw: Request, lm: LoadedModel, plan: _Plan,
        top_lp: int | None, recorder: Recorder,
    ) -> Response:
        formatter = lm.formatter
        if formatter is None:
            raise InvalidRequestError(
                f"model '{req.model}' has no chat template (a base model); use /v1/completions",
                param="model", code="model_not_chat",
            )
        sampling = sampling_params(req, lm, top_logprobs=top_lp, constraint=plan.constraint)
        await validate_constraint(lm, plan.constraint)
        messages = _messages(req)

        def render_and_tokenize() -> list[int]:
            prompt = formatter.render(messages, tools=plan.tools or None)
            bos = formatter.template.bos_token
            add_special = not (bos and prompt.startswith(bos))
            return lm.engine.tokenize(prompt, add_special=add_special)

        tokens = await anyio.to_thread.run_sync(render_and_tokenize)
        recorder.prompt_tokens = len(tokens)
        max_tokens = completion_budget(lm, len(tokens), req.token_limit(), "messages")
        gen = GenerationRequest(new_id("chatcmpl"), tokens, max_tokens, sampling, req.stop_list())
        handle = submit(lm, gen)
        first = await first_event(handle, raw)
        if first is None:
            recorder.close("499")
            return Response(status_code=499)
        raise_if_error(first)
        call = _Call(req, gen.request_id, first, handle, plan, recorder)
        if req.stream:
            return sse(self._stream(call))
        return await self._complete(call, raw)

    # --- non-streaming ----------------------------------------------------------------------

    async def _complete(self, call: _Call, raw: Request) -> Response:
        req, plan, handle, recorder = call.req, call.plan, call.handle, call.recorder
        result = await unless_disconnected(_collect(events_after(call.first, handle), recorder), raw)
        if result is None:
            handle.cancel()
            recorder.close("499")
            return Response(status_code=499)
        text, logprobs, finish = result
        finish_reason: Any = finish.reason
        content: str | None = text
        tool_calls: list[ParsedToolCall] = []
        if plan.mode != "none":
            content, tool_calls = parse_tool_calls(text, plan.forced or plan.tools)
            if tool_calls:
                finish_reason = "tool_calls"
        body = ChatCompletion(
            id=call.cid,
            created=int(time.time()),
            model=req.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=ResponseMessage(
                        content=content,
                        tool_calls=[_tool_call(c) for c in tool_calls] or None,
                    ),
                    finish_reason=finish_reason,
                    logprobs=_choice_logprobs(logprobs) if req.logprobs else None,
                )
            ],
            usage=_usage(finish),
        )
        recorder.close("200")
        return JSONResponse(body.model_dump(mode="json"))

    # --- streaming --------------------------------------------------------------------------

    async def _stream(self, call: _Call) -> AsyncIterator[bytes]:
        req, plan, handle, recorder, cid = call.req, call.plan, call.handle, call.recorder, call.cid
        created = int(time.time())

        def chunk(delta: ChoiceDelta, finish: Any = None, logprobs: list[dict[str, Any]] | None = None,
                  ) -> bytes:
            lp = _choice_logprobs(logprobs) if logprobs is not None else None
            c = ChatCompletionChunk(
                id=cid, created=created, model=req.model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=lp)],
            )
            return frame(chunk_json(c))

        fast = FastChunk(ChatCompletionChunk(
            id=cid, created=created, model=req.model,
            choices=[ChunkChoice(index=0, delta=ChoiceDelta(content="\x00TEXT\x00"))],
        ))
        status = "499"  # until the stream ends normally
        buffering = plan.mode != "none"
        buffer = ""
        try:
            yield chunk(ChoiceDelta(role="assistant", content=""))
            pending: StreamEvent | None = call.first
            while True:
                event = pending if pending is not None else await handle.queue.get()
                pending = None
                if isinstance(event, TextEvent):
                    recorder.on_text(event)
                    lp = chat_logprobs(event.logprobs) if req.logprobs else None
                    if buffering:
                        buffer += event.text
                        if plan.mode == "auto" and not could_become_tool_call(buffer):
                            buffering = False
                            yield chunk(ChoiceDelta(content=buffer), logprobs=lp)
                            buffer = ""
                        continue
                    if lp:
                        yield chunk(ChoiceDelta(content=event.text), logprobs=lp)
                    elif event.text:
                        yield fast.event(event.text)
                elif isinstance(event, FinishEvent):
                    handle.done = True
                    if event.reason == "cancelled":
                        return
                    recorder.on_finish(event.prompt_tokens, event.completion_tokens)
                    finish_reason: Any = event.reason
                    if buffering and buffer:
                        content, calls = parse_tool_calls(buffer, plan.forced or plan.tools)
                        if calls:
                            finish_reason = "tool_calls"
                            yield chunk(ChoiceDelta(tool_calls=[
                                ToolCallDelta(index=i, id=c.id, type="function",
                                              function=FunctionCall(name=c.name, arguments=c.arguments))
                                for i, c in enumerate(calls)
                            ], content=content))
                        else:
                            yield chunk(ChoiceDelta(content=buffer))
                    yield chunk(ChoiceDelta(), finish=finish_reason)
                    if req.include_usage():
                        usage = ChatCompletionChunk(id=cid, created=created, model=req.model,
                                                    choices=[], usage=_usage(event))
                        yield frame(chunk_json(usage))
                    status = "200"
                    break
                elif isinstance(event, ErrorEvent):
                    handle.done = True
                    status = str(event.error.status)
                    yield frame(error_chunk(event.error, recorder.request_id))
                    break
            yield DONE
        finally:
            if not handle.done:
                handle.cancel()
            recorder.close(status)


async def _collect(
    events: AsyncIterator[StreamEvent], recorder: Recorder
) -> tuple[str, list[dict[str, Any]], FinishEvent]:
    parts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    async for event in events:
        if isinstance(event, TextEvent):
            recorder.on_text(event)
            parts.append(event.text)
            logprobs.extend(chat_logprobs(event.logprobs))
        elif isinstance(event, ErrorEvent):
            raise event.error
        elif isinstance(event, FinishEvent):
            recorder.on_finish(event.prompt_tokens, event.completion_tokens)
            return "".join(parts), logprobs, event
    raise RuntimeError("event stream ended without a finish event")  # pragma: no cover


def _usage(finish: FinishEvent) -> Usage:
    return Usage.of(finish.prompt_tokens, finish.completion_tokens, finish.cached_tokens)


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(
        id=call.id, type="function", function=FunctionCall(name=call.name, arguments=call.arguments)
    )


def _choice_logprobs(entries: list[dict[str, Any]]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[TokenLogprob.model_validate(x) for x in entries])
