"""``model.get_embedding_client()``: OpenAI-shaped embeddings, computed in this process."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exception import FoundryLocalException

if TYPE_CHECKING:
    from openai.types import CreateEmbeddingResponse

    from .manager import FoundryLocalManager


class EmbeddingClient:
    def __init__(self, model_id: str, manager: FoundryLocalManager) -> None:
        self.model_id = model_id
        self._manager = manager

    @staticmethod
    def _check(text: object) -> None:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("Input must be a non-empty string.")

    def _run(self, value: str | list[str]) -> CreateEmbeddingResponse:
        from openai.types import CreateEmbeddingResponse

        from .inproc import embeddings

        m = self._manager
        try:
            body = m._runtime.call(embeddings(m._core, {"model": self.model_id, "input": value}))
        except FoundryLocalException as exc:
            raise FoundryLocalException(
                f"Embedding generation failed for model '{self.model_id}': {exc}") from exc
        return CreateEmbeddingResponse.model_validate(body)

    def generate_embedding(self, input_text: str) -> CreateEmbeddingResponse:
        self._check(input_text)
        return self._run(input_text)

    def generate_embeddings(self, inputs: list[str]) -> CreateEmbeddingResponse:
        if not inputs:
            raise ValueError("Inputs must be a non-empty list of strings.")
        for text in inputs:
            self._check(text)
        return self._run(list(inputs))
