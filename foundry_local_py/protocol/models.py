"""/v1/models types."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from .common import WireModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "foundry-local-py"
    # Extensions (ignored by OpenAI clients): what a local user wants to know at a glance.
    loaded: bool = False
    cached: bool = False
    variant: str | None = None
    engine: str | None = None
    device: str | None = None
    context_length: int | None = None
    parent: str | None = None
    """For a LoRA adapter: its base model's id (vLLM's field); None for a base model."""
    root: str | None = None
    """vLLM's field: a base model's variant; an adapter's own name."""
    endpoints: list[str] = Field(default_factory=list)
    """The generating routes this model answers (a chat model: chat completions, completions, the
    Responses API, the Messages API; a base model: completions), and /v1/embeddings when its
    engine produces embeddings."""


class LoadLoraAdapterRequest(WireModel):
    """vLLM's body for POST /v1/load_lora_adapter (``model``: our extension, the base)."""

    lora_name: Annotated[str, Field(min_length=1, max_length=64)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="The base model (alias); default: the one loaded model.")


class UnloadLoraAdapterRequest(WireModel):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    lora_name: Annotated[str, Field(min_length=1, max_length=64)]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)
