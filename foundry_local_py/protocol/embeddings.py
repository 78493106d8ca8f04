"""/v1/embeddings request and response types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StrictInt, field_validator

from .common import WireModel

TokenIds = list[Annotated[StrictInt, Field(ge=0)]]


class EmbeddingRequest(WireModel):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[StrictInt, Field(ge=1)] | None = None
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _nonempty(cls, value: str | list[str] | TokenIds | list[TokenIds]
                  ) -> str | list[str] | TokenIds | list[TokenIds]:
        if isinstance(value, str):
            if not value:
                raise ValueError("input must not be empty")
            return value
        if not value or any(isinstance(v, (str, list)) and len(v) == 0 for v in value):
            raise ValueError("input must not be empty or contain empty entries")
        return value

    def inputs(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [list(v)]  # type: ignore[arg-type]
        return list(v)  # type: ignore[arg-type]


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
