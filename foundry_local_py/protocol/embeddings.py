"""/v1/embeddings request and response types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from .common import TextsOrTokens, WireModel, as_list, check_texts_or_tokens


class EmbeddingRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: TextsOrTokens
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, value: TextsOrTokens) -> TextsOrTokens:
        return check_texts_or_tokens(value, "input")

    def inputs(self) -> list[str | list[int]]:
        return as_list(self.input)


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
