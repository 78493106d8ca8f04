"""/v1/completions request and response types (OpenAI legacy completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator

from .common import FinishReason, SamplingFields, Usage

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(
        cls, value: str | list[str] | TokenIds | list[TokenIds]
    ) -> str | list[str] | TokenIds | list[TokenIds]:
        if isinstance(value, str):
            if value == "":
                raise ValueError("prompt must not be empty")
            return value
        if len(value) == 0:
            raise ValueError("prompt must not be empty")
        if any(isinstance(p, (str, list)) and len(p) == 0 for p in value):
            raise ValueError("prompt must not contain empty entries")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each entry a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None
