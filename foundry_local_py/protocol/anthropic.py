"""/v1/messages and /v1/messages/count_tokens types (Anthropic Messages API wire format).

Shapes follow the official ``anthropic`` client (``anthropic/types/``). As in protocol/responses.py,
what this server cannot honour is refused by the wire model with a 400 naming the field: content
blocks other than text / tool_use / tool_result (``image``, ``document``, ``thinking``, ...) at
``messages[i].content[j].type``, server tools (``web_search_20250305``, ``bash_...``) at
``tools[i].type``, extended thinking at ``thinking.type``. Errors on these routes are rendered in
Anthropic's shape by server/errors.py. Unions are tagged ``<name>`` (left out of ``param``).
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

from .common import TEXT_ONLY, WireModel, text_or_list, type_of, unsupported

# --- content blocks -----------------------------------------------------------------------------


class TextBlockParam(WireModel):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None
    citations: list[Any] | None = None


class ToolUseBlockParam(WireModel):
    """A tool call the assistant made earlier, sent back with the conversation."""

    type: Literal["tool_use"]
    id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class UnsupportedBlock(WireModel):
    """A block this server cannot read or never produces (image, document, thinking, ...)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise unsupported("content blocks", value,
                           f"{TEXT_ONLY}; messages may hold text, tool_use and tool_result blocks")


def _text_block_tag(value: Any) -> str | None:
    t = type_of(value)
    if not isinstance(t, str):
        return None
    return "<text>" if t == "text" else "<unsupported>"


ToolResultContentBlock = Annotated[
    Annotated[TextBlockParam, Tag("<text>")] | Annotated[UnsupportedBlock, Tag("<unsupported>")],
    Discriminator(_text_block_tag, custom_error_type="invalid_content_block",
                  custom_error_message="each content block must be an object with a string 'type'"),
]

ToolResultContent = Annotated[
    Annotated[str, Tag("<text>")] | Annotated[list[ToolResultContentBlock], Tag("<list>")],
    Discriminator(text_or_list, custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a list of content blocks"),
]


class ToolResultBlockParam(WireModel):
    """The result of a tool call, for the model to use."""

    type: Literal["tool_result"]
    tool_use_id: Annotated[str, Field(min_length=1, max_length=256)]
    content: ToolResultContent | None = None
    is_error: StrictBool | None = None
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlockParam))


_BLOCK_TYPES = {"text", "tool_use", "tool_result"}


def _block_tag(value: Any) -> str | None:
    t = type_of(value)
    if not isinstance(t, str):
        return None
    return f"<{t}>" if t in _BLOCK_TYPES else "<unsupported>"


ContentBlockParam = Annotated[
    Annotated[TextBlockParam, Tag("<text>")]
    | Annotated[ToolUseBlockParam, Tag("<tool_use>")]
    | Annotated[ToolResultBlockParam, Tag("<tool_result>")]
    | Annotated[UnsupportedBlock, Tag("<unsupported>")],
    Discriminator(_block_tag, custom_error_type="invalid_content_block",
                  custom_error_message="each content block must be an object with a string 'type'"),
]

MessageContent = Annotated[
    Annotated[str, Tag("<text>")] | Annotated[list[ContentBlockParam], Tag("<list>")],
    Discriminator(text_or_list, custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a list of content blocks"),
]


class MessageParam(WireModel):
    role: Literal["user", "assistant"]
    content: MessageContent

    def blocks(self) -> list[TextBlockParam | ToolUseBlockParam | ToolResultBlockParam]:
        if isinstance(self.content, str):
            return [TextBlockParam(type="text", text=self.content)]
        return [b for b in self.content if not isinstance(b, UnsupportedBlock)]


SystemPrompt = Annotated[
    Annotated[str, Tag("<text>")] | Annotated[list[ToolResultContentBlock], Tag("<list>")],
    Discriminator(text_or_list, custom_error_type="invalid_system",
                  custom_error_message="system must be a string or a list of text blocks"),
]


# --- tools --------------------------------------------------------------------------------------


class ToolParam(WireModel):
    """A client tool (``type`` absent or ``custom``)."""

    type: Literal["custom"] | None = None
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[a-zA-Z0-9_\-]+$")]
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict[str, Any] | None = None
    strict: StrictBool | None = None


class UnsupportedTool(WireModel):
    """A server tool (``web_search_20250305``, ``bash_20250124``, ``text_editor_...``, ...)."""

    type: str

    @field_validator("type")
    @classmethod
    def _refuse(cls, value: str) -> str:
        raise unsupported("tools", value, "this server runs client tools only (no 'type', or 'custom')")


def _tool_tag(value: Any) -> str | None:
    if not isinstance(value, (dict, BaseModel)):
        return None
    t = type_of(value)
    return "<custom>" if t is None or t == "custom" else "<unsupported>"


AnthropicTool = Annotated[
    Annotated[ToolParam, Tag("<custom>")] | Annotated[UnsupportedTool, Tag("<unsupported>")],
    Discriminator(_tool_tag, custom_error_type="invalid_tool",
                  custom_error_message="each tool must be an object"),
]


class ToolChoiceAuto(WireModel):
    type: Literal["auto"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceAny(WireModel):
    type: Literal["any"]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceTool(WireModel):
    type: Literal["tool"]
    name: Annotated[str, Field(min_length=1)]
    disable_parallel_tool_use: StrictBool | None = None


class ToolChoiceNone(WireModel):
    type: Literal["none"]


def _choice_tag(value: Any) -> str | None:
    t = type_of(value)
    return f"<{t}>" if t in ("auto", "any", "tool", "none") else None


ToolChoice = Annotated[
    Annotated[ToolChoiceAuto, Tag("<auto>")]
    | Annotated[ToolChoiceAny, Tag("<any>")]
    | Annotated[ToolChoiceTool, Tag("<tool>")]
    | Annotated[ToolChoiceNone, Tag("<none>")],
    Discriminator(_choice_tag, custom_error_type="invalid_tool_choice",
                  custom_error_message="tool_choice.type must be 'auto', 'any', 'tool' or 'none'"),
]


class ThinkingConfig(WireModel):
    type: str
    budget_tokens: StrictInt | None = None

    @field_validator("type")
    @classmethod
    def _disabled_only(cls, value: str) -> str:
        if value != "disabled":
            raise PydanticCustomError(
                "unsupported", "extended thinking is not supported by this server's models")
        return value


class JsonOutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    format: JsonOutputFormat | None = None
    effort: str | None = None


class Metadata(WireModel):
    user_id: Annotated[str, Field(max_length=256)] | None = None


# --- requests -----------------------------------------------------------------------------------


def _check_tool_choice(choice: Any, info: ValidationInfo) -> Any:
    if isinstance(choice, ToolChoiceTool) and not any(
        isinstance(t, ToolParam) and t.name == choice.name for t in info.data.get("tools") or []
    ):
        raise PydanticCustomError(
            "unknown_tool", "tool_choice names '{name}', which is not among the tools",
            {"name": choice.name[:64]},
        )
    return choice


class CountTokensRequest(WireModel):
    """POST /v1/messages/count_tokens: the prompt of a Messages request, without generating."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[MessageParam], Field(min_length=1)]
    system: SystemPrompt | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None

    @field_validator("tools")
    @classmethod
    def _unique_tool_names(cls, tools: list[Any] | None) -> list[Any] | None:
        names = [t.name for t in tools or [] if isinstance(t, ToolParam)]
        if len(set(names)) != len(names):
            raise PydanticCustomError("duplicate_tools", "tool names must be unique")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        return _check_tool_choice(choice, info)

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        if isinstance(self.system, str):
            return self.system
        return "\n".join(b.text for b in self.system if isinstance(b, TextBlockParam))


class MessagesRequest(CountTokensRequest):
    """POST /v1/messages. ``max_tokens`` is required, as in Anthropic's API."""

    max_tokens: Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
    stop_sequences: list[Annotated[str, Field(min_length=1)]] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=100_000)] | None = None
    stream: StrictBool = False
    metadata: Metadata | None = None


# --- responses ----------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = TextBlock | ToolUseBlock

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                     "model_context_window_exceeded"]


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int | None = 0
    cache_read_input_tokens: int | None = 0


class Message(BaseModel):
    """A Messages API response."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    content: list[ContentBlock]
    model: str
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


class TokenCount(BaseModel):
    input_tokens: int


# --- stream events ------------------------------------------------------------------------------
# Framed as ``event: <type>`` + ``data: <json>`` (the official client reads the event name).
# Order: message_start, then per content block: content_block_start, content_block_delta*,
# content_block_stop; then message_delta (stop_reason, output usage), message_stop. ``ping``
# may come anywhere; ``error`` replaces the rest when generation fails mid-way.


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJsonDelta


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaUsage(BaseModel):
    output_tokens: int


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(BaseModel):
    type: Literal["ping"] = "ping"


StreamEvent = (
    MessageStartEvent | ContentBlockStartEvent | ContentBlockDeltaEvent | ContentBlockStopEvent
    | MessageDeltaEvent | MessageStopEvent | PingEvent
)
