"""POST /v1/chat/completions: OpenAI chat requests as generation asks, events as chat chunks."""

from __future__ import annotations

from typing import Any

from ...config import Settings
from ...engines.base import Constraint
from ...engines.chat_format import ParsedToolCall, ToolSpec, could_become_tool_call
from ...errors import InvalidRequestError
from ...generation import ChatPrompt, Generation, GenerationAsk
from ...protocol.chat import (
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
from ...protocol.common import ChoiceLogprobs, TokenLogprob
from ...scheduler.output import LogprobEntry
from ...scheduler.scheduler import FinishEvent, TextEvent
from ..serving import DONE, ChoiceOutcome, FastChunk, FrontEnd, Outcome, chunk_json, frame
from .openai_common import lora_asks, sampling_ask, usage_of


def chat_messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The wire messages as the prompt renderer takes them (name, tool calls and ids kept)."""
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


def chat_ask(req: ChatCompletionRequest) -> GenerationAsk:
    if req.top_logprobs is not None and req.top_logprobs > 0 and not req.logprobs:
        raise InvalidRequestError("top_logprobs needs logprobs=true", param="top_logprobs")
    tools = [ToolSpec(t.function.name, t.function.description, t.function.parameters or {})
             for t in req.tools or []]
    choice = req.tool_choice
    tool_choice = choice.function.name if isinstance(choice, NamedToolChoice) else choice
    constraint = None
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        constraint = Constraint(kind="json_object")
    elif rf is not None and rf.type == "json_schema":
        assert rf.json_schema is not None
        constraint = Constraint(kind="json_schema", schema=rf.json_schema.schema_)
    return GenerationAsk(
        model=req.model,
        prompt=ChatPrompt(chat_messages(req), tools, tool_choice),
        max_tokens=req.token_limit(),
        sampling=sampling_ask(req),
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
        stop=req.stop_list(),
        response_format=constraint,
        n=req.n,
        ep=req.ep,
        ttl=req.ttl,
        lora=lora_asks(req),
        params={"max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None
                else "max_tokens"},
    )


class ChatFrontEnd(FrontEnd[ChatCompletionRequest]):
    endpoint = "/v1/chat/completions"
    request_type = ChatCompletionRequest
    id_prefix = "chatcmpl"

    @classmethod
    def asks(cls, req: ChatCompletionRequest, settings: Settings) -> list[GenerationAsk]:
        return [chat_ask(req)]

    def __init__(self, req: ChatCompletionRequest, gen: Generation) -> None:
        super().__init__(req, gen)
        self.plan = gen.requests[0].tools
        self._fast: FastChunk | None = None
        self._buffering = self.plan.mode != "none"
        self._buffer = ""

    # --- streaming --------------------------------------------------------------------------

    def _chunk(self, delta: ChoiceDelta, finish: Any = None,
               logprobs: list[LogprobEntry] | None = None) -> bytes:
        c = ChatCompletionChunk(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish,
                                 logprobs=_choice_logprobs(logprobs) if logprobs else None)],
        )
        return frame(chunk_json(c))

    def stream_start(self) -> list[bytes]:
        self._fast = FastChunk(ChatCompletionChunk(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[ChunkChoice(index=0, delta=ChoiceDelta(content="\x00TEXT\x00"))],
        ))
        return [self._chunk(ChoiceDelta(role="assistant", content=""))]

    def stream_text(self, index: int, event: TextEvent) -> bytes | None:
        lp = event.logprobs if self.req.logprobs else None
        if self._buffering:
            self._buffer += event.text
            if self.plan.mode == "auto" and not could_become_tool_call(self._buffer):
                self._buffering = False
                text, self._buffer = self._buffer, ""
                return self._chunk(ChoiceDelta(content=text), logprobs=lp)
            return None
        if lp:
            return self._chunk(ChoiceDelta(content=event.text), logprobs=lp)
        if event.text and self._fast is not None:
            return self._fast.event(event.text)
        return None

    def stream_finish(self, index: int, event: FinishEvent, choice: ChoiceOutcome) -> list[bytes]:
        out = []
        reason: Any = event.reason
        if self._buffering and self._buffer:
            content, calls = self.plan.parse(self._buffer)
            if calls:
                reason = "tool_calls"
                out.append(self._chunk(ChoiceDelta(content=content, tool_calls=[
                    ToolCallDelta(index=i, id=c.id, type="function",
                                  function=FunctionCall(name=c.name, arguments=c.arguments))
                    for i, c in enumerate(calls)
                ])))
            else:
                out.append(self._chunk(ChoiceDelta(content=self._buffer)))
        out.append(self._chunk(ChoiceDelta(), finish=reason))
        return out

    def stream_end(self, outcome: Outcome) -> list[bytes]:
        if not self.req.include_usage():
            return [DONE]
        usage = ChatCompletionChunk(id=self.gen.id, created=self.created, model=self.req.model,
                                    choices=[], usage=usage_of(outcome))
        return [frame(chunk_json(usage)), DONE]

    # --- non-streaming ----------------------------------------------------------------------

    def body(self, outcome: Outcome) -> dict[str, Any]:
        choice = outcome.choices[0]
        content, calls = self.plan.parse(choice.text)
        finish: Any = "tool_calls" if calls else choice.finish_reason
        return ChatCompletion(
            id=self.gen.id, created=self.created, model=self.req.model,
            choices=[ChatChoice(
                index=0,
                message=ResponseMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None),
                finish_reason=finish,
                logprobs=_choice_logprobs(choice.logprobs) if self.req.logprobs else None,
            )],
            usage=usage_of(outcome),
        ).model_dump(mode="json")


def _tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, type="function",
                    function=FunctionCall(name=call.name, arguments=call.arguments))


def _choice_logprobs(entries: list[LogprobEntry]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob.model_validate({
            "token": e.token, "logprob": e.logprob, "bytes": list(e.raw),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(raw)} for (t, raw, lp) in e.top],
        })
        for e in entries
    ])
