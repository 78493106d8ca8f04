"""/v1/responses request, response and stream-event types (OpenAI Responses API wire format).

Shapes follow the official ``openai`` client (``openai/types/responses/``). Where this server cannot
honour something the API defines (images and files on text-only models, built-in tools such as
``web_search``, item types we never produce), the wire model refuses it: the request is a 400 whose
``param`` names the field (``input[2].content[0].type``, ``tools[1].type``), never silently ignored.
Unknown *fields* are ignored, as everywhere in this package.

Unions are tagged by a function (pydantic's callable discriminators) so that only the branch the
value selects is validated and its errors carry an exact location; tags are written ``<name>``,
which the error map leaves out of ``param``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    Tag,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from .common import TEXT_ONLY, Temperature, TopP, WireModel, text_or_list, type_of, unsupported

# --- input content ------------------------------------------------------------------------------


class InputText(WireModel):
    type: Literal["input_text"]
    text: str


class OutputText(WireModel):
    """Assistant text sent back as input (``annotations`` and ``logprobs`` are accepted, unused)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None


class Refusal(WireModel):
    type: Literal["refusal"]
    refusal: str


class UnsupportedPart(WireModel):
    """A content part this server cannot read (``input_image``, ``input_file``, ``input_audio``)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise unsupported("content parts", value, TEXT_ONLY)


_TEXT_PARTS = {"input_text", "output_text", "refusal"}


def _part_tag(value: Any) -> str | None:
    t = type_of(value)
    if not isinstance(t, str):
        return None
    return f"<{t}>" if t in _TEXT_PARTS else "<unsupported>"


ContentPart = Annotated[
    Annotated[InputText, Tag("<input_text>")]
    | Annotated[OutputText, Tag("<output_text>")]
    | Annotated[Refusal, Tag("<refusal>")]
    | Annotated[UnsupportedPart, Tag("<unsupported>")],
    Discriminator(_part_tag, custom_error_type="invalid_content_part",
                  custom_error_message="each content part must be an object with a string 'type'"),
]

Content = Annotated[
    Annotated[str, Tag("<text>")] | Annotated[list[ContentPart], Tag("<list>")],
    Discriminator(text_or_list, custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a list of content parts"),
]


def content_text(content: str | list[Any]) -> str:
    """The text of a message's content (parts joined)."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if isinstance(part, (InputText, OutputText)):
            out.append(part.text)
        elif isinstance(part, Refusal):
            out.append(part.refusal)
    return "".join(out)


# --- input items --------------------------------------------------------------------------------


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(WireModel):
    """A message; ``type`` may be left out (``{"role": "user", "content": "hi"}``)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Content
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return content_text(self.content)


class FunctionCallItem(WireModel):
    """A function call the model made earlier, sent back with the conversation."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(WireModel):
    """The result of a function call, for the model to use."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    output: Content
    id: str | None = None
    status: ItemStatus | None = None

    def text(self) -> str:
        return content_text(self.output)


class UnsupportedItem(WireModel):
    """An item type this server does not handle (reasoning, web_search_call, computer_call, ...)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise unsupported("input items", value, "this server handles messages, function_call and "
                           "function_call_output items")


_ITEM_TYPES = {"message", "function_call", "function_call_output"}


def _item_tag(value: Any) -> str | None:
    t = type_of(value)
    if t is None and isinstance(value, dict) and "role" in value:
        return "<message>"
    if not isinstance(t, str):
        return None
    return f"<{t}>" if t in _ITEM_TYPES else "<unsupported>"


InputItem = Annotated[
    Annotated[MessageItem, Tag("<message>")]
    | Annotated[FunctionCallItem, Tag("<function_call>")]
    | Annotated[FunctionCallOutputItem, Tag("<function_call_output>")]
    | Annotated[UnsupportedItem, Tag("<unsupported>")],
    Discriminator(_item_tag, custom_error_type="invalid_item",
                  custom_error_message="each input item must be an object with a string 'type' "
                                       "(or a message with a 'role')"),
]

Input = Annotated[
    Annotated[Annotated[str, Field(min_length=1)], Tag("<text>")]
    | Annotated[list[InputItem], Tag("<list>")],
    Discriminator(text_or_list, custom_error_type="invalid_input",
                  custom_error_message="input must be a string or a list of input items"),
]


# --- tools and formats --------------------------------------------------------------------------


class FunctionTool(WireModel):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class UnsupportedTool(WireModel):
    """A built-in tool (``web_search``, ``file_search``, ``code_interpreter``, ``mcp``, ...)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise unsupported("tools", value, "this server runs function tools only")


def _tool_tag(value: Any) -> str | None:
    t = type_of(value)
    if not isinstance(t, str):
        return None
    return "<function>" if t == "function" else "<unsupported>"


ToolParam = Annotated[
    Annotated[FunctionTool, Tag("<function>")] | Annotated[UnsupportedTool, Tag("<unsupported>")],
    Discriminator(_tool_tag, custom_error_type="invalid_tool",
                  custom_error_message="each tool must be an object with a string 'type'"),
]


class ToolChoiceFunction(WireModel):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1)]


ToolChoice = Literal["none", "auto", "required"] | ToolChoiceFunction


class FormatText(WireModel):
    type: Literal["text"]


class FormatJsonObject(WireModel):
    type: Literal["json_object"]


class FormatJsonSchema(WireModel):
    type: Literal["json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_\-]+$")]
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: StrictBool | None = None


def _format_tag(value: Any) -> str | None:
    t = type_of(value)
    return f"<{t}>" if t in ("text", "json_object", "json_schema") else None


TextFormat = Annotated[
    Annotated[FormatText, Tag("<text>")]
    | Annotated[FormatJsonObject, Tag("<json_object>")]
    | Annotated[FormatJsonSchema, Tag("<json_schema>")],
    Discriminator(_format_tag, custom_error_type="invalid_format",
                  custom_error_message="format.type must be 'text', 'json_object' or 'json_schema'"),
]


class TextConfig(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


# --- the request --------------------------------------------------------------------------------


class ResponseCreateRequest(WireModel):
    """POST /v1/responses."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Input
    instructions: str | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    store: StrictBool = True
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    stream: StrictBool = False
    user: str | None = None
    background: StrictBool | None = None
    conversation: Any = None

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[Any] | None) -> list[Any] | None:
        names = [t.name for t in tools or [] if isinstance(t, FunctionTool)]
        if len(set(names)) != len(names):
            raise PydanticCustomError("duplicate_tools", "tool names must be unique")
        return tools

    @field_validator("background")
    @classmethod
    def _no_background(cls, value: bool | None) -> bool | None:
        if value:
            raise PydanticCustomError("unsupported", "background responses are not supported")
        return value

    @field_validator("conversation")
    @classmethod
    def _no_conversation(cls, value: Any) -> Any:
        if value is not None:
            raise PydanticCustomError(
                "unsupported", "conversations are not supported: use previous_response_id")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        return check_tool_choice(choice, info.data.get("tools"))

    def items(self) -> list[MessageItem | FunctionCallItem | FunctionCallOutputItem]:
        """``input`` as items (a string is one user message)."""
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return [item for item in self.input if not isinstance(item, UnsupportedItem)]

    def text_format(self) -> FormatText | FormatJsonObject | FormatJsonSchema | None:
        return self.text.format if self.text is not None else None


def check_tool_choice(choice: Any, tools: list[Any] | None) -> Any:
    """A named tool_choice must name one of the tools."""
    if isinstance(choice, ToolChoiceFunction) and not any(
        isinstance(t, FunctionTool) and t.name == choice.name for t in tools or []
    ):
        raise PydanticCustomError(
            "unknown_tool", "tool_choice names '{name}', which is not among the tools",
            {"name": choice.name[:64]},
        )
    return choice


class InputTokensRequest(WireModel):
    """POST /v1/responses/input_tokens: what a /v1/responses request's input costs, in tokens."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Input | None = None
    instructions: str | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    text: TextConfig | None = None

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        return check_tool_choice(choice, info.data.get("tools"))


# --- the response -------------------------------------------------------------------------------


class OutputTextContent(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputTextContent]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> ResponseUsage:
        return cls(
            input_tokens=prompt, input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=completion, output_tokens_details=OutputTokensDetails(),
            total_tokens=prompt + completion,
        )


class ResponseError(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]


class ResponseObject(BaseModel):
    """The response object (``Response`` in the official client)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    completed_at: int | None = None
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    background: bool = False

    def output_text(self) -> str:
        return "".join(c.text for item in self.output if isinstance(item, OutputMessage)
                       for c in item.content)


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class InputTokenCount(BaseModel):
    object: Literal["response.input_tokens"] = "response.input_tokens"
    input_tokens: int


# --- stream events ------------------------------------------------------------------------------
# Each event is framed as ``event: <type>`` + ``data: <json>``; ``sequence_number`` counts from 0.
# Order for one response: created, in_progress, then per output item: output_item.added,
# [content_part.added, output_text.delta*, output_text.done, content_part.done] or
# [function_call_arguments.delta*, function_call_arguments.done], output_item.done; finally one of
# completed / incomplete / failed (a failure before the stream starts is an HTTP error instead).

class ResponseLifecycleEvent(BaseModel):
    """response.created / in_progress / completed / incomplete / failed."""

    type: Literal["response.created", "response.in_progress", "response.completed",
                  "response.incomplete", "response.failed"]
    sequence_number: int
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputTextContent


class OutputTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class FunctionCallArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


StreamEvent = (
    ResponseLifecycleEvent | OutputItemEvent | ContentPartEvent | OutputTextDeltaEvent
    | OutputTextDoneEvent | FunctionCallArgumentsDeltaEvent | FunctionCallArgumentsDoneEvent
)
