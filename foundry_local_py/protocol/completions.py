"""/v1/completions request and response types (OpenAI legacy completions)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictBool, StrictInt, field_validator

from .common import FinishReason, SamplingFields, TextsOrTokens, Usage, as_list, check_texts_or_tokens


class CompletionRequest(SamplingFields):
    prompt: TextsOrTokens
    echo: StrictBool = False
    suffix: str | None = None
    best_of: StrictInt | None = None
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_nonempty(cls, value: TextsOrTokens) -> TextsOrTokens:
        return check_texts_or_tokens(value, "prompt")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each entry a string or a list of token ids."""
        return as_list(self.prompt)


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
