"""POST /v1/messages: Anthropic Messages API requests as generation asks, events as its stream.

- ``system`` becomes a system message; a user message's ``tool_result`` blocks become tool
  messages (in order, before its text), an assistant message's ``tool_use`` blocks its tool calls:
  the chat the shared prompt renderer takes, so ``/v1/messages/count_tokens`` (same ask, same
  renderer) equals ``usage.input_tokens``.
- ``tool_choice`` auto / any (= required) / tool (named) / none; ``stop_sequences``;
  ``temperature``, ``top_p``, ``top_k``; ``output_config.format`` json_schema is grammar-constrained.
- ``stop_reason``: ``tool_use`` when the reply holds tool calls, ``stop_sequence`` (with the
  sequence), ``max_tokens``, ``model_context_window_exceeded`` (a ``max_tokens`` larger than what
  the context leaves is not refused, as on Anthropic's newer models: generation stops at the
  context), else ``end_turn``.
- Streaming: ``message_start``, ``ping``, then per content block ``content_block_start``,
  ``content_block_delta`` (``text_delta`` / ``input_json_delta``), ``content_block_stop``, then
  ``message_delta`` (stop reason, output tokens) and ``message_stop``; a failure mid-way is an
  ``error`` event in Anthropic's error shape. Each event is named (``event: <type>``), as the
  official client requires.
- Usage: ``input_tokens`` is the whole prompt. Anthropic's cache fields describe its explicit
  prompt caching (``cache_control``), which this server does not do, so they are 0; the automatic
  prefix cache shows in the metrics.
"""

from __future__ import annotations

import json
from typing import Any

from ...config import Settings
from ...engines.base import Constraint
from ...engines.chat_format import ParsedToolCall, ToolSpec
from ...errors import FoundryError, InvalidRequestError
from ...generation import ChatPrompt, Generation, GenerationAsk, SamplingAsk
from ...protocol.anthropic import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    StopReason,
    StreamEvent,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ToolChoiceAny,
    ToolChoiceAuto,
    ToolChoiceNone,
    ToolChoiceTool,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
)
from ...scheduler.scheduler import FinishEvent, TextEvent
from ..errors import foundry_error_body
from ..serving import ChoiceOutcome, FrontEnd, Outcome, frame
from .tool_text import ToolAwareText

ENDPOINT = "/v1/messages"
PARAMS = {"prompt": "messages", "max_tokens": "max_tokens", "stop": "stop_sequences",
          "tool_choice": "tool_choice", "response_format": "output_config.format"}


def chat_messages(req: CountTokensRequest) -> list[dict[str, Any]]:
    """Anthropic messages (and system) as the messages the prompt renderer takes."""
    out: list[dict[str, Any]] = []
    system = req.system_text()
    if system:
        out.append({"role": "system", "content": system})
    names: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        blocks = m.blocks()
        if not blocks:
            raise InvalidRequestError("messages must not have empty content", param=f"messages[{i}].content")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(blocks):
            where = f"messages[{i}].content[{j}].type"
            if isinstance(b, TextBlockParam):
                texts.append(b.text)
            elif isinstance(b, ToolUseBlockParam):
                if m.role != "assistant":
                    raise InvalidRequestError("tool_use blocks belong in assistant messages", param=where)
                names[b.id] = b.name
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input)}})
            elif isinstance(b, ToolResultBlockParam):
                if m.role != "user":
                    raise InvalidRequestError("tool_result blocks belong in user messages", param=where)
                content = b.text()
                tool: dict[str, Any] = {"role": "tool", "tool_call_id": b.tool_use_id,
                                        "content": f"Error: {content}" if b.is_error else content}
                if b.tool_use_id in names:
                    tool["name"] = names[b.tool_use_id]
                out.append(tool)
        if m.role == "assistant":
            message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts) if texts else None}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
        elif texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def tool_choice_of(req: CountTokensRequest) -> str | None:
    choice = req.tool_choice
    if choice is None or isinstance(choice, ToolChoiceAuto):
        return None if choice is None else "auto"
    if isinstance(choice, ToolChoiceAny):
        return "required"
    if isinstance(choice, ToolChoiceTool):
        return choice.name
    assert isinstance(choice, ToolChoiceNone)
    return "none"


def messages_ask(req: CountTokensRequest) -> GenerationAsk:
    """The ask for a Messages request (or a count_tokens request: same prompt, no generation)."""
    if req.messages[-1].role == "assistant":
        raise InvalidRequestError(
            "This model does not support assistant message prefill. The conversation must end with "
            "a user message.", param="messages")
    tools = [ToolSpec(t.name, t.description, t.input_schema)
             for t in req.tools or [] if isinstance(t, ToolParam)]
    constraint = None
    if req.output_config is not None and req.output_config.format is not None:
        constraint = Constraint(kind="json_schema", schema=req.output_config.format.schema_)
    prompt = ChatPrompt(chat_messages(req), tools, tool_choice_of(req))
    if not isinstance(req, MessagesRequest):
        return GenerationAsk(model=req.model, prompt=prompt, response_format=constraint, params=PARAMS)
    return GenerationAsk(
        model=req.model,
        prompt=prompt,
        max_tokens=req.max_tokens,
        cap_to_context=True,
        sampling=SamplingAsk(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k),
        stop=list(req.stop_sequences or []),
        response_format=constraint,
        params=PARAMS,
    )


def _parallel(req: MessagesRequest) -> bool:
    choice = req.tool_choice
    return not (isinstance(choice, (ToolChoiceAuto, ToolChoiceAny, ToolChoiceTool))
                and choice.disable_parallel_tool_use)


def _tool_use(call: ParsedToolCall) -> ToolUseBlock:
    return ToolUseBlock(id=call.id, name=call.name, input=json.loads(call.arguments))


class MessagesFrontEnd(FrontEnd[MessagesRequest]):
    endpoint = ENDPOINT
    request_type = MessagesRequest
    id_prefix = "msg"

    @classmethod
    def asks(cls, req: MessagesRequest, settings: Settings) -> list[GenerationAsk]:
        return [messages_ask(req)]

    def __init__(self, req: MessagesRequest, gen: Generation) -> None:
        super().__init__(req, gen)
        self.text = ToolAwareText(gen.requests[0].tools, parallel=_parallel(req))
        self.block = -1  # index of the last content block started
        self.text_open = False
        self.stop_reason: StopReason = "end_turn"
        self.stop_sequence: str | None = None
        self._delta_head = self._delta_tail = b""

    def _reason(self, event: FinishEvent | None, calls: list[ParsedToolCall]) -> None:
        if calls:
            self.stop_reason = "tool_use"
        elif event is not None and event.stop_sequence is not None:
            self.stop_reason, self.stop_sequence = "stop_sequence", event.stop_sequence
        elif event is not None and event.reason == "length":
            capped = event.completion_tokens < self.req.max_tokens
            self.stop_reason = "model_context_window_exceeded" if capped else "max_tokens"

    def _usage(self, outcome: Outcome) -> Usage:
        prompt, completion, _cached = outcome.usage()
        return Usage(input_tokens=prompt, output_tokens=completion)

    # --- non-streaming ----------------------------------------------------------------------

    def body(self, outcome: Outcome) -> dict[str, Any]:
        choice = outcome.choices[0]
        text, calls = self.text.parse(choice.text)
        self._reason(choice.finish, calls)
        content: list[TextBlock | ToolUseBlock] = []
        if text or not calls:
            content.append(TextBlock(text=text))
        content.extend(_tool_use(c) for c in calls)
        return Message(
            id=self.gen.id, content=content, model=self.req.model, stop_reason=self.stop_reason,
            stop_sequence=self.stop_sequence, usage=self._usage(outcome),
        ).model_dump(mode="json")

    # --- streaming --------------------------------------------------------------------------

    @staticmethod
    def _send(event: StreamEvent) -> bytes:
        data = event.model_dump(mode="json")
        return frame(json.dumps(data, ensure_ascii=False, separators=(",", ":")), event=data["type"])

    def stream_start(self) -> list[bytes]:
        start = Message(id=self.gen.id, content=[], model=self.req.model,
                        usage=Usage(input_tokens=self.gen.prompt_tokens, output_tokens=0))
        return [self._send(MessageStartEvent(message=start)), self._send(PingEvent())]

    def _open_text(self) -> bytes:
        self.block += 1
        self.text_open = True
        template = ContentBlockDeltaEvent(index=self.block, delta=TextDelta(text=""))
        head, _, tail = self._send(template).partition(b'"text":""')
        self._delta_head, self._delta_tail = head + b'"text":', tail
        return self._send(ContentBlockStartEvent(index=self.block, content_block=TextBlock(text="")))

    def _text_delta(self, text: str) -> bytes:
        """The hot path: a text delta spliced into its pre-serialised frame (equal to
        ``_send(ContentBlockDeltaEvent(...))``; a unit test holds them together)."""
        return self._delta_head + json.dumps(text, ensure_ascii=False).encode() + self._delta_tail

    def stream_text(self, index: int, event: TextEvent) -> bytes | None:
        shown = self.text.feed(event.text)
        if not shown:
            return None
        if not self.text_open:
            return self._open_text() + self._text_delta(shown)
        return self._text_delta(shown)

    def stream_finish(self, index: int, event: FinishEvent, choice: ChoiceOutcome) -> list[bytes]:
        rest, calls = self.text.finish()
        self._reason(event, calls)
        out: list[bytes] = []
        if rest or (not calls and not self.text_open):
            if not self.text_open:
                out.append(self._open_text())
            if rest:
                out.append(self._text_delta(rest))
        if self.text_open:
            out.append(self._send(ContentBlockStopEvent(index=self.block)))
        for c in calls:
            self.block += 1
            block = ToolUseBlock(id=c.id, name=c.name, input={})
            out.append(self._send(ContentBlockStartEvent(index=self.block, content_block=block)))
            out.append(self._send(ContentBlockDeltaEvent(index=self.block,
                                                         delta=InputJsonDelta(partial_json=c.arguments))))
            out.append(self._send(ContentBlockStopEvent(index=self.block)))
        return out

    def stream_end(self, outcome: Outcome) -> list[bytes]:
        _prompt, completion, _cached = outcome.usage()
        delta = MessageDelta(stop_reason=self.stop_reason, stop_sequence=self.stop_sequence)
        return [self._send(MessageDeltaEvent(delta=delta, usage=MessageDeltaUsage(output_tokens=completion))),
                self._send(MessageStopEvent())]

    def stream_error(self, error: FoundryError, request_id: str) -> list[bytes]:
        _status, body = foundry_error_body(error, request_id, "anthropic")
        return [frame(json.dumps(body), event="error")]
