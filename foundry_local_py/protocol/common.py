"""Types shared by the OpenAI endpoints: sampling fields, usage, errors, logprobs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator
from pydantic_core import PydanticCustomError

# Floats reject NaN and +-Inf (Python's json module accepts them as literals).
Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]
TopP = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0, allow_inf_nan=False)]
PositiveInt = Annotated[StrictInt, Field(ge=1, le=2**31 - 1)]
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**64 - 1)]


TokenIds = list[Annotated[StrictInt, Field(ge=0)]]
TextsOrTokens = str | list[str] | TokenIds | list[TokenIds]
"""What OpenAI accepts as ``prompt`` / ``input``: a string, strings, token ids, or lists of them."""


def check_texts_or_tokens(value: TextsOrTokens, field: str) -> TextsOrTokens:
    """Reject an empty value or empty entries (a validator body for such fields)."""
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field} must not be empty")
        return value
    if not value or any(isinstance(v, (str, list)) and len(v) == 0 for v in value):
        raise ValueError(f"{field} must not be empty or contain empty entries")
    return value


def as_list(value: TextsOrTokens) -> list[str | list[int]]:
    """Each entry a string or a list of token ids (one flat id list is one entry)."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


TEXT_ONLY = "this server serves text-only models"


def type_of(value: Any) -> Any:
    """A content part's or block's ``type``, whether it is still a dict or already a model."""
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def text_or_list(value: Any) -> str | None:
    """Discriminator tag of a ``str | list[...]`` content field."""
    if isinstance(value, str):
        return "<text>"
    if isinstance(value, list):
        return "<list>"
    return None


def unsupported(kind: str, value: str, why: str) -> PydanticCustomError:
    """The 400 for a content type this server refuses (names the type, says why)."""
    return PydanticCustomError(
        "unsupported", "{kind} of type '{value}' are not supported: {why}",
        {"kind": kind, "value": value[:64], "why": why},
    )


class WireModel(BaseModel):
    """Requests ignore unknown vendor fields (as llama.cpp and Ollama do) but type-check known ones."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class StreamOptions(WireModel):
    include_usage: StrictBool = False


class LoraItem(WireModel):
    """llama.cpp server's per-request adapter entry: the adapter's index (as listed for the
    model) or its name, and its scale."""

    id: Annotated[StrictInt, Field(ge=0, le=10_000)] | Annotated[str, Field(min_length=1, max_length=64)]
    scale: Annotated[float, Field(ge=-4.0, le=4.0, allow_inf_nan=False)] = 1.0


class SamplingFields(WireModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[StrictInt, Field(ge=0, le=100_000)] | None = Field(
        None, description="Foundry Local / llama.cpp extension."
    )
    min_p: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: Seed | None = None
    random_seed: Seed | None = Field(None, description="Foundry Local's name for seed.")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)] | None = None
    stop: str | list[str] | None = None
    n: StrictInt = Field(1, description="Only 1 is supported.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0, allow_inf_nan=False)]] | None = None
    user: str | None = None
    ep: str | None = Field(None, description="Foundry Local: execution provider for this request.")
    ttl: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="Foundry Local: keep-alive.")
    lora: Annotated[list[LoraItem], Field(max_length=8)] | None = Field(
        None, description="llama.cpp server: LoRA adapters for this request ({id, scale}).")

    @field_validator("stop")
    @classmethod
    def _stop_nonempty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and any(not isinstance(s, str) or s == "" for s in value):
            raise ValueError("stop strings must be non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else []
        return list(self.stop)

    def effective_seed(self) -> int | None:
        return self.seed if self.seed is not None else self.random_seed

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0
    """Prompt tokens whose KV entries came from the prefix cache instead of being computed."""


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
