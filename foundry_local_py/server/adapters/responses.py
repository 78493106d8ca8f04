"""POST /v1/responses: OpenAI Responses API requests as generation asks, events as typed events.

- Input items become the chat the shared prompt renderer takes: ``instructions`` first as a
  system message, then the stored conversation of ``previous_response_id`` (its input and output
  items, from the response store), then this request's items. ``function_call`` items become an
  assistant message's tool calls, ``function_call_output`` items tool messages. Because a follow-up
  renders the earlier turns exactly as before, its prompt starts with the earlier prompt and the
  model's reply, and the prefix cache serves them.
- Output: a message item (output_text) and/or ``function_call`` items, parsed by the tool plan.
- Streaming: ``response.created``, ``response.in_progress``, then per output item ``added`` ...
  ``done`` with its content part / text deltas or function-call argument events, then
  ``response.completed`` or ``response.incomplete`` (``max_output_tokens``); a failure mid-way is
  ``response.failed``. Every event carries ``sequence_number`` (0, 1, 2, ...).
- ``store`` (default true): the finished response and its input items go to the response store
  before the client can ask for them (retrieve, input_items, delete, previous_response_id).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any, ClassVar

from pydantic import BaseModel, Field, TypeAdapter

from ...config import Settings
from ...engines.base import Constraint
from ...engines.chat_format import ParsedToolCall, ToolSpec
from ...errors import FoundryError, InvalidRequestError, NotFoundError
from ...generation import ChatPrompt, Generation, GenerationAsk, SamplingAsk
from ...protocol.responses import (
    ContentPartEvent,
    FormatJsonObject,
    FormatJsonSchema,
    FunctionCallArgumentsDeltaEvent,
    FunctionCallArgumentsDoneEvent,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    IncompleteDetails,
    InputItem,
    MessageItem,
    OutputFunctionCall,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputTextContent,
    OutputTextDeltaEvent,
    OutputTextDoneEvent,
    ResponseCreateRequest,
    ResponseError,
    ResponseLifecycleEvent,
    ResponseObject,
    ResponseUsage,
    StreamEvent,
    ToolChoiceFunction,
)
from ...scheduler.scheduler import FinishEvent, TextEvent
from ..errors import client_message
from ..response_store import ResponseStore, StoredResponse
from ..serving import ChoiceOutcome, FrontEnd, Outcome, frame
from .tool_text import ToolAwareText

ENDPOINT = "/v1/responses"
PARAMS = {"prompt": "input", "max_tokens": "max_output_tokens", "response_format": "text.format",
          "tool_choice": "tool_choice", "temperature": "temperature", "top_p": "top_p"}

_items = TypeAdapter(list[InputItem])


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# --- wire items -> stored items -> chat messages ------------------------------------------------


def stored_items(
    items: list[MessageItem | FunctionCallItem | FunctionCallOutputItem],
) -> list[dict[str, Any]]:
    """This request's input items as stored and listed: each with an id, string contents as parts."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            if isinstance(item.content, str):
                kind = "output_text" if item.role == "assistant" else "input_text"
                content: list[dict[str, Any]] = [{"type": kind, "text": item.content}]
            else:
                content = [p.model_dump(mode="json", exclude_none=True) for p in item.content]
            out.append({"id": item.id or item_id("msg"), "type": "message", "role": item.role,
                        "content": content, "status": item.status or "completed"})
        elif isinstance(item, FunctionCallItem):
            out.append({"id": item.id or item_id("fc"), "type": "function_call", "call_id": item.call_id,
                        "name": item.name, "arguments": item.arguments, "status": item.status or "completed"})
        else:
            output: Any = item.output if isinstance(item.output, str) else [
                p.model_dump(mode="json", exclude_none=True) for p in item.output]
            out.append({"id": item.id or item_id("fco"), "type": "function_call_output",
                        "call_id": item.call_id, "output": output, "status": item.status or "completed"})
    return out


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored-shape items (and instructions) as the messages the prompt renderer takes."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    names: dict[str, str] = {}
    for item in _items.validate_python(items):
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            names[item.call_id] = item.name
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # text and calls of one turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            message = {"role": "tool", "tool_call_id": item.call_id, "content": item.text()}
            if item.call_id in names:
                message["name"] = names[item.call_id]
            messages.append(message)
    return messages


def tools_of(req: ResponseCreateRequest) -> list[ToolSpec]:
    return [ToolSpec(t.name, t.description, t.parameters or {})
            for t in req.tools or [] if isinstance(t, FunctionTool)]


def tool_choice_of(req: ResponseCreateRequest) -> str | None:
    choice = req.tool_choice
    return choice.name if isinstance(choice, ToolChoiceFunction) else choice


def constraint_of(req: ResponseCreateRequest) -> Constraint | None:
    fmt = req.text_format()
    if isinstance(fmt, FormatJsonSchema):
        return Constraint(kind="json_schema", schema=fmt.schema_)
    if isinstance(fmt, FormatJsonObject):
        return Constraint(kind="json_object")
    return None


# --- the front-end ------------------------------------------------------------------------------


class ResponsesCall(BaseModel):
    """A parsed request with what the store adds: the conversation it continues."""

    wire: ResponseCreateRequest
    history: list[dict[str, Any]] = Field(default_factory=list)
    """Items of the previous response's conversation (its input, then its output)."""
    new_items: list[dict[str, Any]] = Field(default_factory=list)
    """This request's input items, with ids."""

    @property
    def stream(self) -> bool:
        return self.wire.stream


def responses_ask(call: ResponsesCall) -> GenerationAsk:
    req = call.wire
    if req.truncation == "auto":
        raise InvalidRequestError(
            "truncation 'auto' is not supported: an input that does not fit the model's context is "
            "a 400 (truncation 'disabled')", param="truncation")
    messages = chat_messages(req.instructions, [*call.history, *call.new_items])
    return GenerationAsk(
        model=req.model,
        prompt=ChatPrompt(messages, tools_of(req), tool_choice_of(req)),
        max_tokens=req.max_output_tokens,
        sampling=SamplingAsk(temperature=req.temperature, top_p=req.top_p),
        response_format=constraint_of(req),
        params=PARAMS,
    )


class ResponsesFrontEnd(FrontEnd[ResponsesCall]):
    endpoint = ENDPOINT
    request_type = ResponseCreateRequest
    id_prefix = "resp"
    store: ClassVar[ResponseStore | None] = None

    @classmethod
    def bind(cls, store: ResponseStore) -> type[ResponsesFrontEnd]:
        """This front-end with its response store (built once per app)."""
        return type(cls.__name__, (cls,), {"store": store})

    @classmethod
    async def prepare(cls, req: ResponseCreateRequest) -> ResponsesCall:
        return ResponsesCall(wire=req, history=await conversation(cls.store, req.previous_response_id),
                             new_items=stored_items(req.items()))

    @classmethod
    def asks(cls, req: ResponsesCall, settings: Settings) -> list[GenerationAsk]:
        return [responses_ask(req)]

    @classmethod
    def streams(cls, req: ResponsesCall) -> bool:
        return req.stream

    def __init__(self, req: ResponsesCall, gen: Generation) -> None:
        super().__init__(req, gen)
        wire = req.wire
        self.text = ToolAwareText(gen.requests[0].tools, parallel=wire.parallel_tool_calls is not False)
        self.seq = 0
        self.msg_id = item_id("msg")
        self.msg_open = False
        self.streamed: list[str] = []
        self.output: list[OutputItem] = []
        self.finish: FinishEvent | None = None
        self._delta_head = self._delta_mid = self._delta_tail = b""
        self._final: ResponseObject | None = None

    # --- the response object ----------------------------------------------------------------

    def response(self, status: str, **extra: Any) -> ResponseObject:
        wire = self.req.wire
        fmt = wire.text_format()
        return ResponseObject(
            id=self.gen.id, created_at=self.created, status=status, model=wire.model,
            instructions=wire.instructions, max_output_tokens=wire.max_output_tokens,
            output=list(self.output), parallel_tool_calls=wire.parallel_tool_calls is not False,
            previous_response_id=wire.previous_response_id, store=wire.store,
            temperature=wire.temperature, top_p=wire.top_p,
            text={"format": fmt.model_dump(mode="json", by_alias=True, exclude_none=True)
                  if fmt else {"type": "text"}},
            tool_choice=(wire.tool_choice.model_dump(mode="json")
                         if isinstance(wire.tool_choice, ToolChoiceFunction) else wire.tool_choice or "auto"),
            tools=[t.model_dump(mode="json", exclude_none=True) for t in wire.tools or []],
            truncation=wire.truncation, user=wire.user, metadata=dict(wire.metadata or {}), **extra,
        )

    def final(self, outcome: Outcome) -> ResponseObject:
        """The finished response (built once: the stream's last event, the body, the stored copy)."""
        if self._final is None:
            prompt, completion, cached = outcome.usage()
            incomplete = self.finish is not None and self.finish.reason == "length"
            self._final = self.response(
                "incomplete" if incomplete else "completed",
                completed_at=int(time.time()),
                incomplete_details=IncompleteDetails(reason="max_output_tokens") if incomplete else None,
                usage=ResponseUsage.of(prompt, completion, cached),
            )
        return self._final

    def _outputs(self, text: str, calls: list[ParsedToolCall], status: str) -> list[OutputItem]:
        out: list[OutputItem] = []
        if text or not calls:
            out.append(OutputMessage(id=self.msg_id, status=status,
                                     content=[OutputTextContent(text=text)]))
        out.extend(OutputFunctionCall(id=item_id("fc"), call_id=c.id, name=c.name, arguments=c.arguments,
                                      status="completed") for c in calls)
        return out

    # --- non-streaming ----------------------------------------------------------------------

    def body(self, outcome: Outcome) -> dict[str, Any]:
        choice = outcome.choices[0]
        self.finish = choice.finish
        text, calls = self.text.parse(choice.text)
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        self.output = self._outputs(text, calls, status)
        return self.final(outcome).model_dump(mode="json")

    async def completed(self, outcome: Outcome) -> None:
        if not self.req.wire.store or self.store is None:
            return
        body = self.final(outcome).model_dump(mode="json")
        await self.store.aput(StoredResponse(
            id=self.gen.id, created_at=time.time(), model=self.req.wire.model,
            previous_response_id=self.req.wire.previous_response_id,
            input_items=[*self.req.history, *self.req.new_items], response=body,
        ))

    # --- streaming --------------------------------------------------------------------------

    def _next(self) -> int:
        seq, self.seq = self.seq, self.seq + 1
        return seq

    @staticmethod
    def _send(event: StreamEvent) -> bytes:
        data = event.model_dump(mode="json")
        return frame(json.dumps(data, ensure_ascii=False, separators=(",", ":")), event=data["type"])

    def _lifecycle(self, kind: Any, response: ResponseObject) -> bytes:
        return self._send(ResponseLifecycleEvent(type=kind, sequence_number=self._next(), response=response))

    def _item(self, kind: Any, index: int, item: OutputItem) -> bytes:
        return self._send(OutputItemEvent(type=kind, sequence_number=self._next(), output_index=index,
                                          item=item))

    def _part(self, kind: Any, part: OutputTextContent) -> bytes:
        return self._send(ContentPartEvent(type=kind, sequence_number=self._next(), item_id=self.msg_id,
                                           output_index=0, content_index=0, part=part))

    def stream_start(self) -> list[bytes]:
        started = self.response("in_progress")
        return [self._lifecycle("response.created", started),
                self._lifecycle("response.in_progress", started)]

    def _open_message(self) -> list[bytes]:
        self.msg_open = True
        template = OutputTextDeltaEvent(sequence_number=0, item_id=self.msg_id, output_index=0,
                                        content_index=0, delta="")
        head, _, tail = self._send(template).partition(b'"sequence_number":0')
        self._delta_head = head + b'"sequence_number":'
        before_delta, _, after_delta = tail.partition(b'"delta":""')
        self._delta_mid, self._delta_tail = before_delta + b'"delta":', after_delta
        return [
            self._item("response.output_item.added", 0,
                       OutputMessage(id=self.msg_id, status="in_progress", content=[])),
            self._part("response.content_part.added", OutputTextContent(text="")),
        ]

    def _delta(self, text: str) -> bytes:
        """The hot path: a text delta event spliced into its pre-serialised frame (equal to
        ``_send(OutputTextDeltaEvent(...))``; a unit test holds them together)."""
        self.streamed.append(text)
        return (self._delta_head + str(self._next()).encode() + self._delta_mid
                + json.dumps(text, ensure_ascii=False).encode() + self._delta_tail)

    def stream_text(self, index: int, event: TextEvent) -> bytes | None:
        shown = self.text.feed(event.text)
        if not shown:
            return None
        if not self.msg_open:
            return b"".join([*self._open_message(), self._delta(shown)])
        return self._delta(shown)

    def stream_finish(self, index: int, event: FinishEvent, choice: ChoiceOutcome) -> list[bytes]:
        self.finish = event
        rest, calls = self.text.finish()
        status = "incomplete" if event.reason == "length" else "completed"
        out: list[bytes] = []
        if self.msg_open or rest or not calls:
            if not self.msg_open:
                out.extend(self._open_message())
            if rest:
                out.append(self._delta(rest))
            text = "".join(self.streamed)
            part = OutputTextContent(text=text)
            message = OutputMessage(id=self.msg_id, status=status, content=[part])
            out.append(self._send(OutputTextDoneEvent(sequence_number=self._next(), item_id=self.msg_id,
                                                      output_index=0, content_index=0, text=text)))
            out.append(self._part("response.content_part.done", part))
            out.append(self._item("response.output_item.done", 0, message))
            self.output.append(message)
        for c in calls:
            i = len(self.output)
            fc = OutputFunctionCall(id=item_id("fc"), call_id=c.id, name=c.name, arguments="",
                                    status="in_progress")
            out.append(self._item("response.output_item.added", i, fc))
            out.append(self._send(FunctionCallArgumentsDeltaEvent(
                sequence_number=self._next(), item_id=fc.id, output_index=i, delta=c.arguments)))
            out.append(self._send(FunctionCallArgumentsDoneEvent(
                sequence_number=self._next(), item_id=fc.id, output_index=i, name=c.name,
                arguments=c.arguments)))
            done = fc.model_copy(update={"arguments": c.arguments, "status": "completed"})
            out.append(self._item("response.output_item.done", i, done))
            self.output.append(done)
        return out

    def stream_end(self, outcome: Outcome) -> list[bytes]:
        final = self.final(outcome)
        kind = "response.incomplete" if final.status == "incomplete" else "response.completed"
        return [self._lifecycle(kind, final)]

    def stream_error(self, error: FoundryError, request_id: str) -> list[bytes]:
        failed = self.response("failed", error=ResponseError(code=error.code or error.type,
                                                             message=client_message(error, request_id)))
        return [self._lifecycle("response.failed", failed)]


async def conversation(store: ResponseStore | None, previous_id: str | None) -> list[dict[str, Any]]:
    """The items a follow-up of ``previous_id`` continues from; 404 when it is not stored."""
    if previous_id is None:
        return []
    stored = await store.aget(previous_id) if store is not None else None
    if stored is None:
        raise NotFoundError(f"Previous response with id '{previous_id[:64]}' not found.",
                            param="previous_response_id", code="previous_response_not_found")
    return stored.conversation()
